"""Search throughput: trials per hour of one search, ``evomerge search`` vs the merge-to-disk loop of mergekit-evolve.

The same search (zoo experts, search space, lm-eval tasks, validation docs, trial budget) is run two ways in one run:

* **evomerge**: ``evomerge search CONFIG --no-export`` as a user runs it (a subprocess). Its sampler proposes the
  recipes; each trial is materialized in place into the live model and scored by lm-eval over that model. Per trial
  the study stores ``merge_seconds`` and ``eval_seconds``; the rest of a trial's span (Optuna's start to complete)
  is the sampler and the storage. Start-up (interpreter, imports, engine load, task building) is paid once.
* **mergekit loop**: every recipe the evomerge study scored, in the same order, exported with
  :func:`evomerge.recipe.mergekit.to_mergekit` and run as mergekit-evolve runs a candidate: ``mergekit-yaml config.yml
  OUT --copy-tokenizer`` (``--cuda`` on CUDA) writes it to disk, then lm-eval's CLI ``lm-eval run --model hf
  --model_args pretrained=OUT dtype=... --tasks ... --include_path ...`` loads it and scores the same docs, then OUT
  is deleted. Both sides score the same recipes, so their scores must agree per trial and task: the benchmark checks
  it (a wrong export, a different merge or a different evaluation would show up as a score difference).

Which mergekit-evolve mode the loop reproduces: mergekit 0.1.5's default, ``--strategy pool --no-in-memory``
(``OnDiskMergeEvaluator`` in ``mergekit/evo/actors.py``): per candidate ``run_merge`` into a temp dir under the storage
path (``copy_tokenizer=True``, one shard), then ``lm_eval.simple_evaluate(model="huggingface",
model_args={"pretrained": dir, ...})``, then ``shutil.rmtree(dir)``. mergekit-evolve does this inside a long-lived
ray actor, so it does not pay the interpreter start-up and imports per candidate; the loop here runs the two CLIs a
user without ray runs, and reports their start-up apart so that the ratio without it (what the ray actor saves) is
in the table too. Its ``--in-memory`` mode (documented by mergekit as "dark sorcery", not the default, refused by
the ``serial`` and ``buffered`` strategies) writes each merge into one live model instead; it still re-plans and
re-runs mergekit's whole merge graph and ``simple_evaluate`` (task building included) per candidate; it is not
reproduced here (mergekit-evolve needs ray, cma and lm-eval in mergekit's venv, and evomerge runs mergekit only as
an external tool). mergekit-evolve evaluates in ``dtype=bfloat16``; the loop uses the checkpoints' dtype, as evomerge
does, so the two sides can be compared score for score.

Per-trial time split (seconds, medians over the trials):

* evomerge: merge = ``merge_seconds``; load = 0 (the live model is written in place; the one-time start-up is its
  own column); evaluate = ``eval_seconds``; other = trial span - merge - evaluate.
* loop: merge = the ``mergekit-yaml`` process (start to exit, its CLI start-up included); load = loading OUT as
  lm-eval's HF model does (``from_pretrained`` of model and tokenizer, timed again in this process right after the
  CLI, on the same files); evaluate = lm-eval's ``simple_evaluate`` (its own start time, from the results file, to
  the process's exit) minus load; other = lm-eval's start-up before ``simple_evaluate`` (interpreter, imports,
  task index) and deleting OUT.

Trials per hour: ``3600 * trials / (sum of trial times)``; evomerge's also with its one-time start-up and its final
test scoring and report (the whole command); the loop's also without its start-ups (what mergekit-evolve's ray
actor, which imports once and builds lm-eval's task index once, does not pay per candidate), measured per trial:
mergekit-yaml's (process start to the end of its imports: the console script's import and call are run with a time
stamp between them) and lm-eval's (process start to ``simple_evaluate``'s start).

    python benchmarks/search_throughput.py                 # full zoo (built on first use), 24 trials, CPU
    python benchmarks/search_throughput.py --quick         # mini zoo, 3 trials, 20 docs per task (a test runs it)

Cost on 2 CPU cores: the loop's trials dominate (the two CLI start-ups alone are seconds per trial); the script
prints the estimate after the evomerge search and the total at the end. mergekit runs from its own venv as in
``benchmarks/candidate_turnaround.py`` (``--mergekit-bin``). Writes results/search_throughput.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable from tests, runnable as a script
from candidate_turnaround import find_mergekit, machine, mergekit_versions, revision  # noqa: E402

from evomerge.recipe import Recipe  # noqa: E402
from evomerge.recipe.mergekit import to_mergekit  # noqa: E402
from evomerge.search import trials as records  # noqa: E402
from evomerge.zoo import Zoo, ZooConfig, cached_zoo  # noqa: E402
from evomerge.zoo.taskfiles import lm_eval_name  # noqa: E402

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
METRIC = "acc"
BATCH_SIZE = 32  # lm-eval's --batch_size on both sides: the same batches give the same log-likelihoods


@dataclass
class Trial:
    """One trial through both tools: the time split (seconds) and the validation ``acc`` per task."""

    number: int
    evo_merge_s: float
    evo_evaluate_s: float
    evo_other_s: float
    evo_total_s: float
    loop_merge_s: float
    loop_load_s: float
    loop_evaluate_s: float
    loop_other_s: float
    loop_total_s: float
    loop_startup_s: float  # mergekit-yaml's start-up (to the end of its imports) + lm-eval's (to simple_evaluate)
    evo_objective: float
    loop_objective: float
    max_abs_score_diff: float  # over the tasks


def cli(name: str) -> str:
    """A console script of this interpreter's environment (``evomerge``, ``lm-eval``), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH; install evomerge's dependencies")
    return found


def validation_task_dir(zoo: Zoo, tasks: list[str], out: Path) -> Path:
    """Copies of the zoo's task YAMLs whose ``test_split`` is the validation split: lm-eval's CLI evaluates a task's
    ``test_split``, and the search scores validation docs (a mergekit-evolve user writes the same YAMLs)."""
    out.mkdir(parents=True)
    for task in tasks:
        config = yaml.safe_load((zoo.task_dir / f"{task}.yaml").read_text())
        config["test_split"] = config["validation_split"]
        (out / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def search_config(zoo: Zoo, tasks: list[str], space: Path, n_trials: int, limit: int | None, device: str,
                  seed: int) -> dict[str, Any]:
    """The run config of the evomerge side (no baselines: every trial is a proposal of the sampler)."""
    evaluator: dict[str, Any] = {"type": "lm_eval", "tasks": tasks, "include_path": [str(zoo.task_dir)],
                                 "metrics": [METRIC], "include_defaults": False, "split": "validation",
                                 "batch_size": BATCH_SIZE}
    if limit is not None:
        evaluator.update(limit=limit, limit_mode="first")  # the first docs, as lm-eval's --limit takes them
    return {"name": "throughput", "base": str(zoo.base), "sources": [str(p) for p in zoo.experts.values()],
            "space": str(space), "evaluator": evaluator, "n_trials": n_trials, "baselines": False,
            "device": device, "seed": seed}


def run_evomerge(config: dict[str, Any], root: Path) -> tuple[list[optuna.trial.FrozenTrial], float, float]:
    """``evomerge --quiet search CONFIG --out RUN --no-export``: its completed trials (in order), the command's wall
    seconds and the seconds from its start to its first trial's start (start-up: imports, engine load, tasks)."""
    path = root / "search.yaml"
    run_dir = root / "run"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = datetime.now()
    start = time.perf_counter()
    done = subprocess.run([cli("evomerge"), "--quiet", "search", str(path), "--out", str(run_dir), "--no-export"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"evomerge search failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=config["name"], storage=f"sqlite:///{run_dir / 'study.db'}")
    complete = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                      key=lambda t: t.number)
    if len(complete) != config["n_trials"]:
        raise RuntimeError(f"evomerge search completed {len(complete)} of {config['n_trials']} trials")
    return complete, wall, (complete[0].datetime_start - started).total_seconds()


def timed_run(cmd: list[str], what: str) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``cmd`` (offline); its result, the wall clock (epoch seconds) at its start and its wall seconds.
    RuntimeError with the stderr tail (naming ``what``) when it fails."""
    started = time.time()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done, started, wall


def run_mergekit(binary: Path, recipe: Recipe, out: Path, device: str) -> tuple[float, float]:
    """``mergekit-yaml config.yml OUT --copy-tokenizer [--cuda]``: the process's wall seconds and its start-up (to the
    end of its imports). The console script's own two lines run under its interpreter with a time stamp between
    them: ``from mergekit.scripts.run_yaml import main``, then ``main()`` with the same arguments."""
    text = binary.read_text(errors="replace")
    entry = re.search(r"^from ([\w.]+) import (\w+)$", text, re.MULTILINE)
    if entry is None:
        raise SystemExit(f"{binary} is not a console script of the form 'from MODULE import main'")
    probe = (f"import sys, time\nfrom {entry[1]} import {entry[2]}\nprint('imported', time.time(), file=sys.stderr)\n"
             f"sys.argv[0] = {binary.name!r}\nsys.exit({entry[2]}())")
    config = out.with_suffix(".yml")
    config.write_text(yaml.safe_dump(to_mergekit(recipe), sort_keys=False))
    cmd = [text.splitlines()[0].removeprefix("#!").strip(), "-c", probe, str(config), str(out), "--copy-tokenizer",
           *(["--cuda"] if device.startswith("cuda") else [])]
    done, started, wall = timed_run(cmd, f"mergekit-yaml {config} {out}")
    stamp = re.search(r"^imported ([\d.]+)$", done.stderr, re.MULTILINE)
    assert stamp is not None, done.stderr[-3000:]
    return wall, float(stamp[1]) - started


def run_lm_eval(model_dir: Path, tasks: list[str], task_dir: Path, out: Path, limit: int | None, device: str,
                dtype: str) -> tuple[dict[str, float], float, float]:
    """lm-eval's CLI on ``model_dir``: per task ``acc``, the process's wall seconds and the seconds from its start to
    ``simple_evaluate``'s (lm-eval records its start time as ``date``)."""
    cmd = [cli("lm-eval"), "run", "--model", "hf", "--model_args", f"pretrained={model_dir}", f"dtype={dtype}",
           "--tasks", *tasks, "--include_path", str(task_dir), "--device", device, "--batch_size", str(BATCH_SIZE),
           "--output_path", str(out), *(["--limit", str(limit)] if limit is not None else [])]
    _, started, wall = timed_run(cmd, " ".join(cmd))
    (path,) = out.rglob("results_*.json")
    results = json.loads(path.read_text())
    shutil.rmtree(out)
    return ({t: results["results"][t][f"{METRIC},none"] for t in tasks}, wall,
            float(results["date"]) - started)


def hf_load_seconds(model_dir: Path, device: str, dtype: str) -> float:
    """Seconds to load ``model_dir`` as lm-eval's HF model does: model (onto the device) and tokenizer."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    AutoTokenizer.from_pretrained(model_dir)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    return seconds


def loop_trial(binary: Path, trial: optuna.trial.FrozenTrial, tasks: list[str], task_dir: Path, root: Path,
               limit: int | None, device: str) -> Trial:
    """``trial``'s recipe through mergekit-yaml and lm-eval's CLI, against what the evomerge study recorded."""
    recipe: Recipe = records.recipe_of(trial)
    dtype = recipe.dtype or "float32"
    out = root / f"merged-{trial.number}"
    merge_s, mergekit_startup = run_mergekit(binary, recipe, out, device)
    scores, eval_wall, startup = run_lm_eval(out, tasks, task_dir, root / f"lm-eval-{trial.number}", limit, device,
                                             dtype)
    load_s = hf_load_seconds(out, device, dtype)
    start = time.perf_counter()
    shutil.rmtree(out)
    out.with_suffix(".yml").unlink()
    cleanup = time.perf_counter() - start
    evaluate_s = eval_wall - startup - load_s
    evo_scores = {t: records.trial_metrics(trial)[f"{t}/{METRIC}"] for t in tasks}
    evo_merge, evo_eval = records.trial_seconds(trial)
    assert evo_merge is not None and evo_eval is not None and trial.datetime_complete and trial.datetime_start
    span = (trial.datetime_complete - trial.datetime_start).total_seconds()
    loop_total = merge_s + eval_wall + cleanup
    return Trial(trial.number, evo_merge, evo_eval, span - evo_merge - evo_eval, span, merge_s, load_s, evaluate_s,
                 startup + cleanup, loop_total, mergekit_startup + startup, statistics.mean(evo_scores.values()),
                 statistics.mean(scores.values()), max(abs(evo_scores[t] - scores[t]) for t in tasks))


def per_hour(n: int, seconds: float) -> float:
    """Trials per hour of ``n`` trials that took ``seconds`` in all."""
    return 3600.0 * n / seconds


def summarize(rows: list[Trial], evo_wall: float, evo_startup: float) -> dict[str, float]:
    """Trials per hour of each side and their ratios (see the module docstring)."""
    n = len(rows)
    evo = per_hour(n, sum(r.evo_total_s for r in rows))
    loop = per_hour(n, sum(r.loop_total_s for r in rows))
    loop_without = per_hour(n, sum(r.loop_total_s - r.loop_startup_s for r in rows))
    evo_command = per_hour(n, evo_wall)
    return {"trials": n, "evo_trials_per_hour": evo, "evo_command_trials_per_hour": evo_command,
            "loop_trials_per_hour": loop, "loop_without_startup_trials_per_hour": loop_without,
            "ratio": evo / loop, "ratio_command": evo_command / loop, "ratio_without_startup": evo / loop_without,
            "evo_startup_s": evo_startup, "evo_wall_s": evo_wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="mini zoo, 3 trials, 20 docs per task")
    parser.add_argument("--zoo", help="a built zoo dir (default: the full zoo, or the mini zoo with --quick, from "
                                      "the zoo cache, built there on first use)")
    parser.add_argument("--space", default=str(SPACES / "task_arithmetic.yaml"),
                        help="search space (a deterministic method: the two sides must score the same weights)")
    parser.add_argument("--n-trials", type=int, help="trial budget (default 24, 3 with --quick)")
    parser.add_argument("--limit", type=int, help="validation docs per task (default: all, 20 with --quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--mergekit-bin", help="mergekit-yaml to run; default: PATH, then /tmp/venv-bench")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    binary = find_mergekit(args.mergekit_bin)  # before any work: a missing mergekit is one line
    n_trials = args.n_trials or (3 if args.quick else 24)
    limit = args.limit if args.limit is not None else (20 if args.quick else None)
    begun = time.perf_counter()
    zoo = Zoo.load(args.zoo) if args.zoo else cached_zoo(ZooConfig.mini() if args.quick else ZooConfig.full(),
                                                        progress=True)
    tasks = [lm_eval_name(t) for t in zoo.experts]
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="evomerge-throughput-"))
    try:
        config = search_config(zoo, tasks, Path(args.space).resolve(), n_trials, limit, args.device, args.seed)
        trials, evo_wall, evo_startup = run_evomerge(config, root)
        print(f"evomerge search: {n_trials} trials, {evo_wall:.1f} s in all ({evo_startup:.1f} s start-up)", flush=True)
        task_dir = validation_task_dir(zoo, tasks, root / "tasks")
        rows: list[Trial] = []
        for trial in trials:
            rows.append(loop_trial(binary, trial, tasks, task_dir, root, limit, args.device))
            r = rows[-1]
            if len(rows) == 1:
                print(f"mergekit loop: ~{r.loop_total_s * n_trials / 60:.1f} min for {n_trials} trials", flush=True)
            print(f"trial {r.number}: evomerge {r.evo_total_s:.2f} s, loop {r.loop_total_s:.1f} s, objective "
                  f"{r.evo_objective:.4f} / {r.loop_objective:.4f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = summarize(rows, evo_wall, evo_startup)
    info = {"machine": machine(torch.device(args.device)), "mergekit": mergekit_versions(binary),
            "revision": revision(), "zoo": zoo.config_hash, "load_before": load_before,
            "load_after": os.getloadavg(), "space": Path(args.space).name, "limit": limit,
            "benchmark_s": time.perf_counter() - begun}
    write_results(Path(args.out), rows, summary, info)
    print(f"{summary['ratio']:.0f}x trials per hour ({summary['evo_trials_per_hour']:.0f} vs "
          f"{summary['loop_trials_per_hour']:.0f}); max score difference "
          f"{max(r.max_abs_score_diff for r in rows):g}; benchmark {info['benchmark_s'] / 60:.1f} min", flush=True)
    return {"rows": rows, "summary": summary}


def write_results(out: Path, rows: list[Trial], summary: dict[str, float], info: dict[str, Any]) -> None:
    """results/search_throughput.csv (one row per trial) and .md (header, summary, medians, agreement)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "search_throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)

    def med(key: str) -> float:
        return statistics.median(getattr(r, key) for r in rows)

    worst = max(r.max_abs_score_diff for r in rows)
    s = summary
    lines = [
        "# Search throughput: `evomerge search` vs the mergekit-yaml + lm-eval loop", "",
        "The same search (recipes proposed by evomerge's sampler, scored by both tools on the same validation docs).",
        "", f"- command: `python {' '.join(sys.argv)}` (evomerge at {info['revision']})",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {info['machine']}",
        f"- libraries: mergekit venv {info['mergekit']}; lm-eval {_version('lm_eval')}, optuna {optuna.__version__}",
        f"- zoo {info['zoo']}, space `{info['space']}`, {s['trials']:.0f} trials, metric `{METRIC}` (mean over the "
        f"experts' tasks), {'all' if info['limit'] is None else info['limit']} validation docs per task, "
        f"batch size {BATCH_SIZE}",
        f"- load average {info['load_before'][0]:.1f} before, {info['load_after'][0]:.1f} after; benchmark "
        f"{info['benchmark_s'] / 60:.1f} min in all", "",
        "| | trials / hour | ratio |", "|---|---:|---:|",
        f"| evomerge (trial spans) | {s['evo_trials_per_hour']:.0f} | {s['ratio']:.1f}x |",
        f"| evomerge (whole command: start-up {s['evo_startup_s']:.1f} s, trials, test scoring) | "
        f"{s['evo_command_trials_per_hour']:.0f} | {s['ratio_command']:.1f}x |",
        f"| mergekit loop | {s['loop_trials_per_hour']:.0f} | 1x |",
        f"| mergekit loop without the two CLIs' start-ups ({med('loop_startup_s'):.1f} s per trial, median) | "
        f"{s['loop_without_startup_trials_per_hour']:.0f} | {s['ratio_without_startup']:.1f}x (evomerge ÷ this) |",
        "", "Median seconds per trial:", "",
        "| | merge | load | evaluate | other | total |", "|---|---:|---:|---:|---:|---:|",
        f"| evomerge | {med('evo_merge_s'):.3f} | 0 | {med('evo_evaluate_s'):.3f} | {med('evo_other_s'):.3f} | "
        f"{med('evo_total_s'):.3f} |",
        f"| mergekit loop | {med('loop_merge_s'):.2f} | {med('loop_load_s'):.2f} | {med('loop_evaluate_s'):.2f} | "
        f"{med('loop_other_s'):.2f} | {med('loop_total_s'):.2f} |", "",
        f"Scores: largest per-task difference between the two sides over all trials and tasks: {worst:g} "
        f"({'the same scores' if worst == 0 else 'NOT the same scores'}).", "",
        "- evomerge: merge = `merge_seconds`, evaluate = `eval_seconds` of each trial; load 0 (in place); other = "
        "the rest of the trial's span (sampler, storage).",
        "- loop: merge = the `mergekit-yaml` process (its start-up included), load = `from_pretrained` of the written "
        "dir (model + tokenizer, timed again in the benchmark's process), evaluate = lm-eval's `simple_evaluate` "
        "minus load, other = lm-eval's start-up before `simple_evaluate` and deleting the dir.",
        "- the loop reproduces mergekit-evolve's default mode (`--strategy pool --no-in-memory`: merge to disk, "
        "evaluate the dir, delete it); mergekit-evolve runs it inside a ray actor without per-candidate start-ups, "
        "which the row without start-ups approximates (see the module docstring of benchmarks/search_throughput.py).",
        "- timings are only comparable within this run; a busy machine slows both sides.",
    ]
    (out / "search_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'search_throughput.md'}")


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package.replace("_", "-"))


if __name__ == "__main__":
    main()
