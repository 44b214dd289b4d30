"""Merging sources that do not fit in memory: peak memory and time per candidate, memory-mapped vs resident.

Writes Llama-shaped synthetic checkpoints (a base and ``--sources`` sources, see merge_throughput.py), then runs the
same candidates in two child processes: one without a memory limit (the engine copies the sources into memory:
``resident``) and one inside a cgroup v1 memory limit smaller than the sources (``memory.limit_in_bytes``; needs
root), where the engine's memory plan leaves them memory-mapped in their safetensors files and reads them per
tensor (``mapped``). Each child reports the plan it chose, its peak RSS (VmHWM), the cgroup's peak usage (page
cache included), and the seconds per candidate (first and second candidate of each method).

    sudo python benchmarks/memory_limit.py                          # ~180M params per model, fp32, 3 sources + base
    python benchmarks/memory_limit.py --params 30e6 --sources 8 --quick   # a small run that checks the script works

A limit below the sources must still hold what the mapped plan needs (the live model twice and the largest tensor's
working set, about models + 3 fp32 copies of it). In a small Llama the 32000-row embedding is a third of the model,
so with 3 sources that is more than the sources themselves: a small run needs more sources (8 at 30e6 parameters).

Writes results/memory_limit.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from merge_throughput import llama_config, write_checkpoints  # benchmarks/ is sys.path[0] when run as a script

from evomerge.checkpoint import Checkpoint
from evomerge.engine import MergeEngine
from evomerge.engine.memory import HEADROOM, stream_working_set_bytes
from evomerge.merge import merge_to_dir
from evomerge.methods import get_method
from evomerge.recipe import Recipe

CGROUP = Path("/sys/fs/cgroup/memory")
METHODS = {"linear": {}, "task_arithmetic": {}, "ties": {"density": 0.3}, "dare_ties": {"density": 0.3}}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _recipe(paths: list[str], method: str, rep: int) -> Recipe:
    weights = [0.5 + 0.1 * rep + 0.2 * i for i in range(len(paths) - 1)]
    return Recipe(method=method, base=paths[0], seed=rep,
                  sources=[{"model": p, "parameters": {"weight": w, **METHODS[method]}}
                           for p, w in zip(paths[1:], weights)])


def stream_child(paths: list[str], dtype: str, methods: list[str], shard: int) -> None:
    """``evomerge merge`` of one recipe per method (tensor by tensor), print one JSON line."""
    imported = _rss()
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=Path(paths[0]).parent) as out:
        for method in methods:
            start = time.perf_counter()
            merge_to_dir(_recipe(paths, method, 0), Path(out) / method, max_shard_size=shard)
            seconds[method] = [time.perf_counter() - start]
            shutil.rmtree(Path(out) / method)
    print(json.dumps({"plan": "streamed", "load_s": 0.0, "seconds": seconds, "peak_rss": _peak_rss(),
                      "imported_rss": imported}), flush=True)


def child(paths: list[str], dtype: str, methods: list[str]) -> None:
    """Build the engine, merge two candidates per method, print one JSON line."""
    imported = _rss()  # the interpreter with torch and transformers, before any model
    start = time.perf_counter()
    engine = MergeEngine(paths, device="cpu", dtype=dtype, methods=methods)
    load = time.perf_counter() - start
    seconds: dict[str, list[float]] = {}
    for method in methods:
        for rep in range(2):
            seconds.setdefault(method, []).append(engine.materialize(_recipe(paths, method, rep)).seconds)
    print(json.dumps({"plan": engine.memory.sources, "load_s": load, "seconds": seconds, "peak_rss": _peak_rss(),
                      "available": engine.memory.available, "imported_rss": imported,
                      "mapped_need": engine.memory.mapped_need}), flush=True)


def run_child(paths: list[str], args: argparse.Namespace, limit: int | None, *, stream: bool = False,
              methods: str | None = None) -> dict:
    """One child process merging ``methods`` (default: ``--methods``), inside a fresh cgroup with ``limit`` bytes
    when given; its JSON line and cgroup peak."""
    group = None
    if limit is not None:
        group = CGROUP / f"evomerge-bench-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    command = [sys.executable, __file__, "--child", "--dtype", args.dtype, "--methods", methods or args.methods,
               *(["--stream"] if stream else []), *paths]

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        done = subprocess.run(command, preexec_fn=enter, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            kind = "evomerge merge" if stream else "engine"
            raise SystemExit(f"{kind} child (limit {limit}) failed ({done.returncode}; -9 is the OOM killer): "
                             f"{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if group is not None:
            result["cgroup_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
        result["limit"] = limit
        return result
    finally:
        if group is not None:
            group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=180e6)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--limit-share", type=float, default=0.6,
                        help="the cgroup limit above the interpreter's own memory, as a share of the sources' bytes "
                             "(base included)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="linear only (checks the script works)")
    parser.add_argument("--out", default="results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard-mb", type=int, default=64, help="--max-shard-size of the evomerge merge run")
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.methods = "linear"
    if args.child:
        if args.stream:
            stream_child(args.paths, args.dtype, args.methods.split(","), args.shard_mb * 2**20)
        else:
            child(args.paths, args.dtype, args.methods.split(","))
        return
    if not (CGROUP / "memory.limit_in_bytes").exists() or not os.access(CGROUP, os.W_OK):
        raise SystemExit(f"needs a writable cgroup v1 memory hierarchy at {CGROUP} (run as root)")
    dtype = getattr(torch, args.dtype)
    root = Path(tempfile.mkdtemp(prefix="evomerge-memory-"))
    try:
        paths = write_checkpoints(root, llama_config(args.params), args.sources, dtype, torch.device("cpu"))
        source_bytes = sum((Path(p) / "model.safetensors").stat().st_size for p in paths)
        resident = run_child(paths, args, None)
        # the limit: the interpreter itself, plus a share of the sources that cannot hold them all, and at least
        # what the mapped plan needs (live model + working set) with the planner's headroom
        need = max(args.limit_share * source_bytes, resident["mapped_need"] / HEADROOM)
        limit = int(1.2 * resident["imported_rss"] + need)
        if limit >= resident["imported_rss"] + source_bytes:
            raise SystemExit(f"the limit ({limit / 1e9:.2f} GB) would hold every source: lower --limit-share")
        mapped = run_child(paths, args, limit)
        # evomerge merge, one child per method: the interpreter, one shard (a tensor larger than --shard-mb gets its
        # own) and the largest tensor's working set of that method (what its memory check asks for, with its
        # headroom); one child each, so no method runs under a limit sized for another's
        with Checkpoint.open(paths[0]) as first:
            largest = max(math.prod(first.shape(n)) for n in first.names)
        shard = max(args.shard_mb * 2**20, largest * dtype.itemsize)
        streamed = []
        for method in args.methods.split(","):
            working = stream_working_set_bytes(get_method(method), largest_tensor=largest, n_sources=len(paths) - 1,
                                               base=True)
            stream_limit = int(1.2 * resident["imported_rss"] + (shard + working) / HEADROOM)
            streamed.append(run_child(paths, args, stream_limit, stream=True, methods=method))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_results(Path(args.out), args, source_bytes, [("no limit", resident), ("cgroup limit", mapped),
                                                       *(("evomerge merge, cgroup limit", r) for r in streamed)])


def write_results(out: Path, args: argparse.Namespace, source_bytes: int, runs: list[tuple[str, dict]]) -> None:
    gb = 1e9
    rows = []
    for label, r in runs:
        for method, times in r["seconds"].items():
            first, second = times[0], times[-1]
            rows.append({"run": label, "limit_GB": "" if r["limit"] is None else f"{r['limit'] / gb:.2f}",
                         "plan": r["plan"], "peak_rss_GB": f"{r['peak_rss'] / gb:.2f}",
                         "cgroup_peak_GB": f"{r.get('cgroup_peak', 0) / gb:.2f}" if "cgroup_peak" in r else "",
                         "load_s": f"{r['load_s']:.2f}", "method": method, "first_s": f"{first:.3f}",
                         "second_s": f"{second:.3f}"})
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "memory_limit"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by = {(r["run"], r["method"]): float(r["second_s"]) for r in rows}
    ratios = [f"{m}: {by[('cgroup limit', m)] / by[('no limit', m)]:.2f}x" for m in args.methods.split(",")]
    lines = [
        "# Sources larger than the memory limit: memory-mapped vs resident", "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        f"- command: `python {' '.join(sys.argv)}`; date: {time.strftime('%Y-%m-%d')}",
        f"- models: Llama-shaped, {args.sources} sources + base, {args.dtype}, {source_bytes / gb:.2f} GB of "
        "safetensors in all",
        "- each run is a child process: `MergeEngine` on CPU, then two candidates per method (first: caches filled;"
        " second: a new candidate, new weights and seed); the `evomerge merge` run merges and writes one recipe per"
        f" method tensor by tensor (shards of {args.shard_mb} MiB; first = second = that one-shot merge, written to"
        " disk) under a limit of the interpreter + one shard + the largest tensor's working set of that method (one"
        " child per method). peak RSS:"
        " VmHWM (file pages of the mapped safetensors"
        " count while mapped); cgroup peak: `memory.max_usage_in_bytes` (page cache included, reclaimable)",
        f"- second candidate, cgroup limit / no limit: {', '.join(ratios)}", "",
        "| run | limit (GB) | plan | peak RSS (GB) | cgroup peak (GB) | load (s) | method | first (s) | second (s) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
        *[f"| {r['run']} | {r['limit_GB']} | {r['plan']} | {r['peak_rss_GB']} | {r['cgroup_peak_GB']} | "
          f"{r['load_s']} | {r['method']} | {r['first_s']} | {r['second_s']} |" for r in rows],
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
