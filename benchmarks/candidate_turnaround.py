"""Candidate turnaround: from a recipe to a model ready to evaluate, evomerge in memory vs mergekit on disk.

Same recipes, same checkpoints, same run. Per candidate:

* evomerge: ``engine.materialize(recipe)`` writes the merge into the engine's live ``transformers`` model in
  place (the engine, built once, is not timed per candidate; its one-time load is reported apart);
* mergekit: the recipe exported with :func:`evomerge.recipe.mergekit.to_mergekit` runs as an external tool,
  ``mergekit-yaml config.yml OUT --copy-tokenizer`` (``--cuda`` on a CUDA device), which writes OUT to disk, then
  ``AutoModelForCausalLM.from_pretrained(OUT)`` moves it onto the device: mergekit total = merge+write + load.

Every candidate of a method uses other weights and densities (and ``engine.invalidate()`` runs before each), so
every tensor is merged again. The first candidate of each method is a warm-up for evomerge; the first mergekit run
of the whole benchmark is a warm-up (page cache, bytecode) — neither is counted. For the deterministic methods the
benchmark checks that both tools produce the same weights (max |Δw| over all tensors and candidates).

Models: Llama-shaped synthetic checkpoints (random weights, a base + ``--sources`` sources), written by
``merge_throughput.write_checkpoints`` into a temp dir (removed at the end), each with a tiny tokenizer so
``--copy-tokenizer`` has files to copy, as on a real checkpoint.

mergekit pins its own torch/transformers/pydantic: install it into a separate venv, e.g.

    bash scripts/mergekit.sh     # mergekit 0.1.5 in its own venv, /tmp/venv-bench
    python benchmarks/candidate_turnaround.py                                   # CPU, ~50M params fp32
    python benchmarks/candidate_turnaround.py --device cuda --params 1.1e9 --dtype bfloat16

Writes results/candidate_turnaround[_<device>].md and .csv (machine, command, table). Run it as a script from the
repository root: it imports ``merge_throughput`` from its own directory.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from merge_throughput import llama_config, write_checkpoints  # benchmarks/ is sys.path[0] when run as a script
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from evomerge.engine import MergeEngine
from evomerge.recipe import Recipe
from evomerge.recipe.mergekit import to_mergekit

DEFAULT_VENV_BIN = Path("/tmp/venv-bench/bin/mergekit-yaml")
INSTALL_HINT = (
    "install mergekit into its own venv (its pins on torch/transformers/pydantic fight evomerge's):\n"
    "    bash scripts/mergekit.sh     # mergekit 0.1.5 in /tmp/venv-bench\n"
    "then rerun (that path is looked up by default) or pass --mergekit-bin PATH/TO/mergekit-yaml"
)

# method -> (needs a base, per-source parameters besides weight, global parameters)
METHODS: dict[str, tuple[bool, tuple[str, ...], dict[str, object]]] = {
    "linear": (False, (), {}),
    "task_arithmetic": (True, (), {}),
    "ties": (True, ("density",), {}),
    "breadcrumbs": (True, ("density", "gamma"), {}),
    "dare_linear": (True, ("density",), {}),
    # normalize given explicitly (both tools' default is False), as the recipes of the earlier runs did
    "dare_ties": (True, ("density",), {"normalize": True}),
}
DETERMINISTIC = {"linear", "task_arithmetic", "ties", "breadcrumbs"}
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
DIFF_TOL = 1e-6  # |Δw| above fp32 rounding of weights ~0.02: a different selection, not a rounding difference


@dataclass
class Row:
    """Medians over the timed candidates of one method (seconds), and the largest weight difference."""

    method: str
    candidates: int
    evomerge_first_s: float  # the warm-up candidate: first merge of this method (allocations, first touch)
    evomerge_materialize_s: float
    mergekit_merge_write_s: float
    from_pretrained_s: float
    mergekit_total_s: float
    speedup: float
    speedup_without_startup: float  # mergekit total minus its CLI start-up (as if run_merge ran in-process)
    max_abs_dw: float | None  # None for stochastic methods (different random masks by design)
    differing_entries: int | None  # entries with |Δw| > DIFF_TOL, most over the candidates


def candidate(method: str, paths: list[str], j: int) -> Recipe:
    """Candidate ``j`` of ``method`` over ``paths`` (base first): weights (and densities) change with ``j`` (< 20).

    Densities are multiples of 1/16 and gamma is 1/64, so ``fraction · numel`` is an integer for every tensor of a
    Llama shape (sizes are multiples of 64): both tools keep ``max(1, floor(d·n))`` entries, and with integers no
    rounding convention enters, so the deterministic methods can be compared weight for weight.
    """
    needs_base, per_source, globals_ = METHODS[method]
    sources = []
    for i, path in enumerate(paths[1:]):
        params: dict[str, float] = {"weight": round(1.0 - 0.2 * i + 0.05 * (j % 20), 3)}
        if "density" in per_source:
            params["density"] = (4 + (i + j) % 5) / 16
        if "gamma" in per_source:
            params["gamma"] = 1 / 64
        sources.append({"model": path, "parameters": params})
    return Recipe(method=method, base=paths[0] if needs_base else None, sources=sources, parameters=globals_,
                  seed=j)


def write_tokenizer(path: Path) -> None:
    """A two-word tokenizer (``tokenizer.json`` + config) so mergekit's ``--copy-tokenizer`` has files to copy."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def find_mergekit(explicit: str | None) -> Path:
    """``--mergekit-bin``, else ``mergekit-yaml`` on PATH, else the default venv; SystemExit with the fix if none."""
    candidates = [Path(explicit)] if explicit else [Path(p) for p in [shutil.which("mergekit-yaml")] if p] + \
        [DEFAULT_VENV_BIN]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    looked = ", ".join(str(p) for p in candidates) + ("" if explicit else " (and PATH)")
    raise SystemExit(f"mergekit-yaml not found (looked at {looked}); {INSTALL_HINT}")


def mergekit_versions(binary: Path) -> str:
    """mergekit / torch / transformers versions of the interpreter in the console script's shebang line."""
    interpreter = binary.read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()
    code = ("import importlib.metadata as m; "
            "print(', '.join(f'{p} {m.version(p)}' for p in ('mergekit', 'torch', 'transformers')))")
    return subprocess.run([interpreter, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def run_mergekit(binary: Path, recipe: Recipe, out: Path, device: torch.device) -> float:
    """Seconds of ``mergekit-yaml config.yml OUT --copy-tokenizer [--cuda]`` (process start to exit)."""
    config = out.with_suffix(".yml")
    config.write_text(yaml.safe_dump(to_mergekit(recipe), sort_keys=False))
    cmd = [str(binary), str(config), str(out), "--copy-tokenizer", *(["--cuda"] if device.type == "cuda" else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def cli_startup(binary: Path, reps: int = 3) -> float:
    """Median seconds of ``mergekit-yaml --help``: interpreter start and imports, a fixed part of every mergekit
    run (the first call also warms the page cache for the later ones)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run([str(binary), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_onto(out: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, float]:
    """``AutoModelForCausalLM.from_pretrained(out)`` on ``device``, and its seconds (synchronized on CUDA)."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, use_safetensors=True).to(device).eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, time.perf_counter() - start


def weight_diff(engine: MergeEngine, model: torch.nn.Module) -> tuple[float, int]:
    """max |live model − mergekit model| over all the engine's tensors (fp32), and how many entries exceed
    ``DIFF_TOL``."""
    theirs = model.state_dict()
    ours = engine.model.state_dict()
    diffs = [(ours[n].float() - theirs[n].float()).abs() for n in engine.names]
    return max(float(d.max()) for d in diffs), sum(int((d > DIFF_TOL).sum()) for d in diffs)


def timed_materialize(engine: MergeEngine, recipe: Recipe) -> float:
    """Seconds of ``engine.materialize(recipe)`` from a clean slate (every tensor merged), plan included."""
    engine.invalidate()
    start = time.perf_counter()
    engine.materialize(recipe)
    return time.perf_counter() - start


def bench_method(
    method: str, engine: MergeEngine, binary: Path, root: Path, n: int, warm_mergekit: bool, startup: float
) -> Row:
    """``n`` timed candidates of ``method`` (after the warm-ups, see the module docstring) through both tools."""
    evo, merge_write, load, diffs = [], [], [], []
    first = timed_materialize(engine, candidate(method, engine.paths, n))  # evomerge warm-up, a recipe of its own
    if warm_mergekit:
        out = root / "warmup"
        run_mergekit(binary, candidate(method, engine.paths, n), out, engine.device)
        shutil.rmtree(out)
    for j in range(n):
        recipe = candidate(method, engine.paths, j)
        evo.append(timed_materialize(engine, recipe))
        out = root / f"{method}-{j}"
        merge_write.append(run_mergekit(binary, recipe, out, engine.device))
        model, seconds = load_onto(out, engine.device, engine.dtype)
        load.append(seconds)
        if method in DETERMINISTIC:
            diffs.append(weight_diff(engine, model))
        del model
        shutil.rmtree(out)
    totals = [a + b for a, b in zip(merge_write, load)]
    evo_s, total_s = statistics.median(evo), statistics.median(totals)
    row = Row(method, n, first, evo_s, statistics.median(merge_write), statistics.median(load), total_s,
              total_s / evo_s, (total_s - startup) / evo_s,
              max(d[0] for d in diffs) if diffs else None, max(d[1] for d in diffs) if diffs else None)
    dw = f"{row.max_abs_dw:.2e} ({row.differing_entries} entries > {DIFF_TOL:g})" if diffs else "n/a (random masks)"
    print(f"{method:16s} evomerge {row.evomerge_materialize_s * 1e3:8.1f} ms | "
          f"mergekit {row.mergekit_merge_write_s:6.1f} s + load {row.from_pretrained_s:5.2f} s = "
          f"{row.mergekit_total_s:6.1f} s | {row.speedup:6.0f}x | "
          f"max|dw| {dw}", flush=True)
    return row


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def revision() -> str:
    """The checkout's git commit, marked when the working tree has uncommitted changes; "unknown" outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + uncommitted changes" if dirty else commit


def machine(device: torch.device) -> str:
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    return (f"{gpu}{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=50e6, help="model size (parameters, about)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="checkpoint and live-model dtype (both tools compute in fp32: the exported YAML says "
                             "dtype: float32, out_dtype: DTYPE)")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=3, help="timed candidates per method")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--mergekit-bin", help=f"mergekit-yaml to run; default: PATH, then {DEFAULT_VENV_BIN}")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    binary = find_mergekit(args.mergekit_bin)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = llama_config(args.params)
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture handler from this field
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="evomerge-turnaround-"))
    try:
        paths = write_checkpoints(root, config, args.sources, dtype, device)
        for path in paths:
            write_tokenizer(Path(path))
        start = time.perf_counter()
        engine = MergeEngine(paths, device=device, dtype=dtype)
        engine_load = time.perf_counter() - start
        n_params = sum(t.numel() for t in engine.model.state_dict().values())
        startup = cli_startup(binary)
        print(f"{n_params / 1e6:.0f}M parameters; evomerge engine load {engine_load:.1f} s (once); "
              f"mergekit-yaml --help {startup:.1f} s", flush=True)
        rows = [bench_method(m, engine, binary, root, args.candidates, warm_mergekit=i == 0, startup=startup)
                for i, m in enumerate(methods)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info = {"machine": machine(device), "mergekit": mergekit_versions(binary), "revision": revision(),
            "n_params": n_params,
            "engine_load": engine_load, "startup": startup, "load_before": load_before, "load_after": os.getloadavg()}
    write_results(Path(args.out), args, device, rows, info)


def write_results(out: Path, args: argparse.Namespace, device: torch.device, rows: list[Row], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("candidate_turnaround" if device.type == "cpu" else f"candidate_turnaround_{device.type}")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    mean_total = statistics.mean(r.mergekit_total_s for r in rows)
    lines = [
        f"# Candidate turnaround ({device.type}): evomerge in memory vs mergekit on disk", "",
        "Time from a recipe to a model ready to evaluate (weights in a live transformers model on the device).", "",
        f"- machine: {info['machine']}",
        f"- mergekit: {info['mergekit']} (separate venv, run as `mergekit-yaml config.yml OUT --copy-tokenizer"
        f"{' --cuda' if device.type == 'cuda' else ''}`)",
        f"- command: `python {' '.join(sys.argv)}` (evomerge at {info['revision']})",
        f"- model: Llama-shaped, {info['n_params'] / 1e6:.0f}M parameters, {args.dtype}, random weights, "
        f"{args.sources} sources + base",
        f"- medians over {args.candidates} candidates per method, each with other weights/densities (every tensor "
        "merged again); warm-ups not counted",
        f"- evomerge engine load (once per search, not per candidate): {info['engine_load']:.1f} s "
        f"= {info['engine_load'] / mean_total:.2f} mean mergekit candidates",
        f"- of every mergekit run, ~{info['startup']:.1f} s is CLI start-up (median of 3 `mergekit-yaml --help`: "
        "interpreter + imports)",
        f"- shared machine: other jobs ran at the same time (load average {info['load_before'][0]:.1f} before, "
        f"{info['load_after'][0]:.1f} after); both tools ran in turn under the same load, so the ratio is more "
        "telling than the absolute times. mergekit's files go to the page cache and are read back from it.", "",
        "| method | evomerge materialize (ms) | mergekit merge+write (s) | from_pretrained (s) | mergekit total (s) "
        f"| speed-up | max \\|Δw\\| | entries \\|Δw\\| > {DIFF_TOL:g} | speed-up w/o mergekit start-up "
        "| evomerge 1st merge (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r.method} | {r.evomerge_materialize_s * 1e3:.0f} | {r.mergekit_merge_write_s:.1f} | "
          f"{r.from_pretrained_s:.2f} | {r.mergekit_total_s:.1f} | {r.speedup:.0f}x | "
          + ("n/a (random) | n/a |" if r.max_abs_dw is None else f"{r.max_abs_dw:.1e} | {r.differing_entries} |")
          + (f" {r.speedup_without_startup:.0f}x |" if r.speedup_without_startup > 0 else " n/a (start-up ≥ total) |")
          + f" {r.evomerge_first_s:.1f} |"
          for r in rows],
        "",
        "- speed-up = mergekit total ÷ evomerge materialize; w/o start-up: (mergekit total − CLI start-up) ÷ evomerge "
        "materialize, what calling mergekit's `run_merge` from a long-lived process would save.",
        "- evomerge 1st merge: the warm-up candidate of each method (first allocation and first touch of its "
        "temporaries), paid once per method in a search.",
        "- every candidate changes the weights and densities, as a search does, and the seed (a search keeps one: "
        "a new seed is the worse case): evomerge's per-keep-count thresholds are never reused; new densities are "
        "looked up in each task vector's sorted magnitudes (sorted during the warm-up candidate, on CPU) and a new "
        "seed refills the counter-based DARE draws.",
        "- from_pretrained maps the safetensors file (a private mapping of the page cache) rather than reading it, "
        "which is why it is cheap; the first forward pass pays the page faults.",
        "",
        "## Semantic differences between the two tools (mergekit 0.1.5)", "",
        "- TIES/breadcrumbs keep count: both keep `max(1, floor(d·n))` entries; at a magnitude tie with the k-th "
        "entry mergekit keeps the first of its unstable sort, evomerge every tied entry (layout independent, same on "
        "CPU and CUDA). fp32 task vectors of millions of entries do have a few such ties (in a check of the "
        "2M-entry lm_head, one source had 2 entries equal to the k-th magnitude): a few entries per model, each off "
        "by about one task-vector entry.",
        "- DARE rescale: evomerge divides survivors by `d` (the paper's `1/(1−p)`); mergekit 0.1.5 rescales the "
        "kept entries so the L1 norm of each task vector is unchanged. Random masks differ as well (mergekit draws "
        "from torch's generator, evomerge from its counter-based one), so DARE weights are not compared.",
        "- `normalize`: the dare_ties candidates set `normalize: true` (both tools' default is false); the exported "
        "YAML carries it.",
        "- dtype: the exported YAML of a bf16/fp16 recipe is `dtype: float32, out_dtype: <dtype>`, so mergekit "
        "computes in fp32 and rounds once, as evomerge does (a hand-written `dtype: bfloat16` makes mergekit round "
        "every step).",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
