"""Merge throughput per method vs a plain torch copy of the same bytes on the same device, in the same run.

Builds Llama-shaped synthetic checkpoints (random weights: a base and 3 sources), loads them once into a
MergeEngine, then times ``engine.materialize`` for each method. Bytes moved per merge = every source and base
tensor read once + the merged tensor written once (storage dtype). The yardstick is ``dst.copy_(src)`` over a
buffer of the same size on the same device: ratio = merge bytes/s ÷ copy bytes/s.

    python benchmarks/merge_throughput.py --params 250e6 --device cpu            # CPU
    python benchmarks/merge_throughput.py --params 1.1e9 --device cuda           # GPU

Writes results/merge_throughput[_<device>].md and .csv (machine, command, table).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.engine import MergeEngine
from evomerge.recipe import Recipe

METHODS: dict[str, dict] = {
    "linear": {"base": False, "params": {}},
    "task_arithmetic": {"base": True, "params": {}},
    "ties": {"base": True, "params": {"density": 0.3}},
    "ties_new_density": {"base": True, "params": {"density": 0.3}, "method": "ties", "vary": "density"},
    "dare_linear": {"base": True, "params": {"density": 0.3}},
    "dare_linear_new_seed": {"base": True, "params": {"density": 0.3}, "method": "dare_linear", "vary": "seed"},
    "dare_ties": {"base": True, "params": {"density": 0.3}},
    "dare_ties_new_seed": {"base": True, "params": {"density": 0.3}, "method": "dare_ties", "vary": "seed"},
    "breadcrumbs": {"base": True, "params": {"density": 0.3, "gamma": 0.01}},
    "della": {"base": True, "params": {"density": 0.3, "epsilon": 0.1}},
    "della_new_density": {"base": True, "params": {"density": 0.3, "epsilon": 0.1}, "method": "della",
                          "vary": "density"},
    "model_stock": {"base": True, "params": {}},
    "slerp": {"base": False, "params": {}, "globals": {"t": 0.3}, "sources": 2},
    "slerp_new_t": {"base": False, "params": {}, "globals": {"t": 0.3}, "sources": 2, "method": "slerp", "vary": "t"},
}


def llama_config(params: float) -> LlamaConfig:
    """A Llama shape of about ``params`` parameters in TinyLlama's proportions (1.1e9 gives TinyLlama's shape:
    hidden 2048, 22 layers, MLP 5632, 32 heads of 64, 4 KV heads, vocabulary 32000, untied head)."""
    layers = max(2, round(22 * (params / 1.1e9) ** (1 / 3)))

    def shape(hidden: int) -> tuple[int, int, int]:
        mlp, kv_heads = int(hidden * 2.75) // 64 * 64, max(1, hidden // 512)
        per_layer = 2 * hidden * hidden + 2 * hidden * 64 * kv_heads + 3 * hidden * mlp + 2 * hidden
        return layers * per_layer + 2 * 32000 * hidden + hidden, mlp, kv_heads

    hidden = min(range(64, 16385, 64), key=lambda h: abs(shape(h)[0] - params))
    _, mlp, kv_heads = shape(hidden)
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=kv_heads, tie_word_embeddings=False)


def write_checkpoints(root: Path, config: LlamaConfig, n: int, dtype: torch.dtype, device: torch.device) -> list[str]:
    """A base and ``n`` sources (base + small noise), saved as HF dirs of random weights (drawn on ``device``)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    base = {k: (randn(s) * 0.02).to(dtype) for k, s in shapes.items()}
    paths = []
    for i in range(n + 1):
        tensors = base if i == 0 else {k: (v.float() + randn(v.shape) * 0.002).to(dtype) for k, v in base.items()}
        tensors = {k: v.cpu() for k, v in tensors.items()}
        path = root / f"m{i}"
        path.mkdir()
        config.save_pretrained(path)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        paths.append(str(path))
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(nbytes: int, device: torch.device, reps: int) -> float:
    """Bytes (read + written) per second of ``dst.copy_(src)`` over a buffer of ``nbytes // 2`` bytes."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() / statistics.median(times)


def recipe_for(method: str, paths: list[str], rep: int) -> Recipe:
    """The benchmark recipe of ``method`` for repetition ``rep``: seed 0 (as in a search, whose recipes keep the
    default seed), except for the ``vary`` rows, which change that parameter (the seed, a density, slerp's t)
    every repetition, as a search does."""
    spec = METHODS[method]
    params, globals_ = dict(spec["params"]), dict(spec.get("globals", {}))
    vary = spec.get("vary")
    for scope in (params, globals_):
        if vary in scope:
            scope[vary] = round(scope[vary] + 0.01 * rep, 4)
    sources = paths[1 : 1 + spec.get("sources", len(paths))]
    return Recipe(method=spec.get("method", method), base=paths[0] if spec["base"] else None,
                  seed=rep if vary == "seed" else 0,
                  parameters=globals_, sources=[{"model": p, "parameters": params} for p in sources])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=250e6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = llama_config(args.params)
    root = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    try:
        paths = write_checkpoints(root, config, args.sources, dtype, device)
        engine = MergeEngine(paths, device=device, dtype=dtype)
        n_params = sum(math.prod(engine.sources.stack(n).shape[1:]) for n in engine.names)
        model_bytes = n_params * dtype.itemsize
        rows = []
        for method in args.methods.split(","):
            engine.clear_caches()  # each row pays and reports its own kept inputs
            times, walls, moved, first = [], [], 0, 0.0
            for rep in range(args.reps + 1):  # the first repetition warms up (compiles, fills caches)
                engine.invalidate()  # every tensor is merged again
                wall = time.perf_counter()
                stats = engine.materialize(recipe_for(method, paths, rep))
                wall = time.perf_counter() - wall
                if rep:
                    times.append(stats.seconds)
                    walls.append(wall)
                    moved = stats.bytes_moved
                else:
                    first = wall
            merge_bw = moved / statistics.median(times)
            copy_bw = copy_bandwidth(moved, device, args.reps)
            kept = sum(engine.cache_bytes().values())
            rows.append({"method": method, "merge_s": statistics.median(times), "merge_GBps": merge_bw / 1e9,
                         "copy_GBps": copy_bw / 1e9, "ratio": merge_bw / copy_bw,
                         "with_plan_s": statistics.median(walls), "first_s": first, "kept_GB": kept / 1e9,
                         "kept_per_model": kept / model_bytes})
            print(f"{method:16s} {rows[-1]['merge_s']*1e3:9.1f} ms  {rows[-1]['merge_GBps']:7.1f} GB/s  "
                  f"copy {rows[-1]['copy_GBps']:7.1f} GB/s  ratio {rows[-1]['ratio']:.2f}x  "
                  f"with plan {rows[-1]['with_plan_s']*1e3:.1f} ms  first {first*1e3:.0f} ms  "
                  f"kept {rows[-1]['kept_GB']:.2f} GB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_results(Path(args.out), args, device, n_params, rows)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_results(out: Path, args: argparse.Namespace, device: torch.device, n_params: int, rows: list[dict]) -> None:
    model_bytes = n_params * getattr(torch, args.dtype).itemsize
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"merge_throughput_{device.type}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Merge throughput ({device.type})", "",
        f"- machine: {machine(device)}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: Llama-shaped, {n_params / 1e6:.0f}M parameters, {args.dtype}, {args.sources} sources + base",
        "- bytes moved per merge: every base and source tensor read once + the result written once",
        "- ratio: merge bytes/s ÷ torch copy bytes/s of the same number of bytes on the same device, same run",
        f"- merge: median of {args.reps} candidates (`MergeStats.seconds`: every tensor merged and written into the"
        " live"
        " model, NaN check included, recipe planning excluded); with plan: wall time of `materialize` including"
        " recipe resolution; first: the first candidate (compilation, threshold cache filled)",
        "- candidates are merged in full (`invalidate`); seed 0 like a search's recipes. Kept across candidates"
        " (what depends on the models only, or on the seed): TIES/breadcrumbs thresholds per keep count and, on CPU,"
        " each task vector's sorted magnitudes (any new density is a lookup); DARE's counter-based uniform draws per"
        " seed (a new seed refills them with one hash kernel); slerp/model stock Gram matrices; DELLA's"
        " magnitude ranks. Rows"
        " `*_new_density` / `*_new_seed` / `*_new_t` change that parameter every candidate, as a search does; `first`"
        " is the first candidate (compilation, sorting, Gram matrices); kept: memory those inputs hold after the"
        " row's candidates (`MergeEngine.cache_bytes`, caches cleared between rows), in GB and in model sizes"
        f" ({model_bytes / 1e9:.2f} GB of {args.dtype} weights per model)", "",
        "| method | merge (ms) | merge GB/s | copy GB/s | ratio to copy | with plan (ms) | first (ms) | kept (GB) |"
        " kept (models) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['method']} | {r['merge_s']*1e3:.1f} | {r['merge_GBps']:.2f} | {r['copy_GBps']:.2f} | {r['ratio']:.2f}x"
          f" | {r['with_plan_s']*1e3:.1f} | {r['first_s']*1e3:.0f} | {r['kept_GB']:.2f} | {r['kept_per_model']:.2f} |"
          for r in rows],
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
