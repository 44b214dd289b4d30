"""What the zoo benchmarks (method_sweep.py, search_vs_baselines.py) share: which zoo, the evaluators, the
calibration text, paired statistics and the results header.

A benchmark's zoo is ``--zoo DIR``; without it, the benchmark zoo at ``$EVOMERGE_BENCH_ZOO`` or ``/work/zoo-bench``
when one is built there; ``--quick`` takes the mini zoo of the test suite (``ZooConfig.mini()``, built into the zoo
cache on first use). Every run scores the experts' tasks: the validation split (optionally ``limit`` docs per task,
a seeded subset) for selection, the whole test split for the report only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from candidate_turnaround import cpu_model, revision  # benchmarks/ is sys.path[0] when run as a script

from evomerge.zoo import Zoo, ZooConfig, cached_zoo
from evomerge.zoo.taskfiles import lm_eval_name

BENCH_ZOO = Path(os.environ.get("EVOMERGE_BENCH_ZOO", "/work/zoo-bench"))
METRIC = "acc"  # the zoo tasks' metric (lm-eval also reports acc_norm: equal for single-token-free choices)
VERSIONS = ("evomerge", "torch", "transformers", "optuna", "lm_eval")


def arg_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds its own, then calls :func:`parse_args`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", help=f"a built zoo (default: {BENCH_ZOO}; --quick: the mini zoo)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--limit", type=int, help="validation docs per task, 0 = all")
    parser.add_argument("--test-limit", type=int, help="test docs per task, 0 = all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="where the studies go (default runs/bench/<benchmark>[_quick])")
    parser.add_argument("--out", default="results")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, name: str,
               defaults: Mapping[str, tuple[Any, Any]]) -> argparse.Namespace:
    """Parse, fill each option left unset from ``defaults`` (``{dest: (default, quick default)}``) and the work dir,
    and set up warnings-only logging."""
    args = parser.parse_args(argv)
    for dest, (full, quick) in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, quick if args.quick else full)
    args.work = args.work or f"runs/bench/{name}{'_quick' if args.quick else ''}"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args


def find_zoo(explicit: str | None, quick: bool) -> Zoo:
    """The zoo a benchmark runs on (module docstring); SystemExit with one line when there is none."""
    if explicit:
        try:
            return Zoo.load(explicit)
        except FileNotFoundError as exc:  # one line, before any model loads
            raise SystemExit(str(exc)) from None
    if quick:
        return cached_zoo(ZooConfig.mini())
    if (BENCH_ZOO / "zoo.json").is_file():
        return Zoo.load(BENCH_ZOO)
    raise SystemExit(f"no benchmark zoo at {BENCH_ZOO}: pass --zoo DIR (e.g. a zoo built by `evomerge zoo build DIR`) "
                     "or --quick for the mini zoo")


def evaluators(zoo: Zoo, limit: int | None, test_limit: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval specs over the experts' tasks (objective: mean accuracy): validation and test (``limit`` /
    ``test_limit`` docs per task, a seeded subset, or all)."""
    spec = {"type": "lm_eval", "tasks": [lm_eval_name(t) for t in zoo.experts], "include_path": [str(zoo.task_dir)],
            "metrics": [METRIC]}
    validation = {**spec, "split": "validation", **({"limit": limit} if limit else {})}
    return validation, {**spec, "split": "test", **({"limit": test_limit} if test_limit else {})}


def task_metrics(names: Sequence[str]) -> list[str]:
    """The ``<task>/acc`` metrics among an evaluator's metric names (one column per task)."""
    return [n for n in names if n.endswith(f"/{METRIC}")]


def calibration_file(zoo: Zoo, path: Path, per_task: int = 16) -> dict[str, Any]:
    """Calibration text for Fisher / RegMean: the first ``per_task`` training items of every expert task,
    interleaved (so a prefix of the file covers every task), written to ``path``; returns the recipe's
    ``calibration`` entry."""
    rows = [zoo.split_file(t, "train").read_text().splitlines()[:per_task] for t in zoo.experts]
    lines = [row[i] for i in range(per_task) for row in rows if i < len(row)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"path": str(path), "n_samples": len(lines)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_bootstrap(diffs: Sequence[float], *, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of paired differences (Efron & Tibshirani 1993, ch. 13):
    resample the ``diffs`` with replacement ``reps`` times, take the 2.5th and 97.5th percentiles of the means."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(reps))
    return means[int(0.025 * (reps - 1))], means[int(0.975 * (reps - 1))]


def cpu_minutes() -> float:
    """CPU time of this process so far (user + system, every thread), in minutes: on a shared machine the wall time
    says little; on a quiet one with 2 cores the wall time is between this and half of it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) / 60


def versions() -> str:
    out = []
    for name in VERSIONS:
        try:
            out.append(f"{name} {metadata.version(name.replace('_', '-'))}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} ?")
    return ", ".join(out)


_LOAD_AT_IMPORT = os.getloadavg()[0]  # the benchmark's start: zoo_bench is imported before any work


def header(title: str, zoo: Zoo, started: float, extra: Sequence[str] = ()) -> list[str]:
    """The Markdown header every result starts with: command, commit, machine, library versions, date, zoo."""
    experts = ", ".join(zoo.experts)
    return [f"# {title}", "",
            f"- command: `python {' '.join(sys.argv)}` (evomerge at {revision()})",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
            f"{platform.python_version()}; 1-min load average {_LOAD_AT_IMPORT:.2f} at start, {os.getloadavg()[0]:.2f} "
            "at the end (other jobs stretch the wall time, never the scores)",
            f"- versions: {versions()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"wall {(time.time() - started) / 60:.1f} min, CPU {cpu_minutes():.1f} min (user + system, all threads)",
            f"- zoo: `{zoo.root}` (config hash {zoo.config_hash}); base + experts on {experts}",
            *extra, ""]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))
