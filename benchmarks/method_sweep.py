"""Method sweep: every registered merge method over its main hyperparameters on the zoo's experts, built on
``evomerge sweep`` (:mod:`evomerge.search.sweep`).

One sweep study holds every method that merges all experts (base = the zoo's base); SLERP, which takes exactly two
models, gets one sweep study per pair of experts, scored on the pair's two tasks (t = 0 and t = 1 are the two
experts alone). Points are ranked on the validation split (mean over seeds for DARE/DELLA); the test split scores
every point for the report only. Each study lives in ``--work`` (SQLite), so an interrupted run resumes where it
stopped (re-run the same command). Cost: every trial is one validation and one test evaluation (lm-eval on CPU
costs ~13 ms of CPU per 4-choice doc on the mini zoo's model, measured on the shared 2-core machine), so the default
run is ~202 x 5 tasks x 140 docs x 13 ms ~ 30 CPU minutes on a 4-layer zoo (more on a deeper one): ~15-30 min on 2
quiet cores (estimated, not yet measured end to end); the results header states the run's own wall and CPU time.
Writes ``results/method_sweep.{md,csv,png}``; the sweeps' own reports (``evomerge report``: a table and plots per
method) stay under ``--work``.

Grids (:data:`GRIDS`): task arithmetic lambda (lambda = 0 is the base, 1/N the uniform average); TIES density x
lambda; DARE-TIES and DARE-linear drop rate p = 1 - density in {0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99} x lambda, 3
seeds; breadcrumbs gamma x density; DELLA density x epsilon, 3 seeds; SCE top-k; RegMean alpha; one point each for
linear (the uniform average), multi-SLERP, Karcher mean, Model Stock, Fisher, RAM and RAM+ (their defaults).
The TIES family runs with ``normalize: true`` (the disjoint / agreeing-weight mean; mergekit's default is a sum for
DARE and breadcrumbs), so one lambda axis means the same for all of them. One exception is swept again on its own
(section :data:`SUMMED`): DARE-TIES with ``normalize: false``, the DARE paper's sum and mergekit's default. With
``normalize: true`` its divisor is the weight of the *agreeing survivors* only, so an entry one source keeps is
that source's ``τ/d`` in full and the merged task vector grows like ``1/d`` (DARE-linear's divisor is every
weight, so its rescaled mean stays unbiased): the normalized DARE-TIES curve measures a scale, not the drop rate.

    python benchmarks/method_sweep.py --zoo /work/zoo-bench      # 187 + 15 trials, 40 val / 100 test docs per task
    python benchmarks/method_sweep.py --quick --out /tmp/ms      # the mini zoo, small grids, seconds (the CI test)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import zoo_bench  # benchmarks/ is sys.path[0] when run as a script
from matplotlib.figure import Figure

from evomerge.report import _save, markdown_table
from evomerge.search.sweep import PointResult, Spread, SweepConfig, SweepSummary, run_sweep, summarize
from evomerge.zoo import Zoo
from evomerge.zoo.taskfiles import lm_eval_name

DROP_RATES = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
DENSITIES = [round(1 - p, 2) for p in DROP_RATES]
NORM = {"normalize": True}
LAMBDAS = [1.0, 2.0]  # the TIES family's scale: 1 = the (disjoint) mean of the task vectors
SUM_LAMBDAS = [0.2, 0.4]  # scale of a sum of the task vectors: task arithmetic peaks near 0.4 (method_sweep.md)
GRIDS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"lambda": [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]},
    "ties": {"density": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0], "lambda": LAMBDAS},
    "dare_ties": {"density": DENSITIES, "lambda": LAMBDAS, **NORM, "seeds": 3},
    "dare_linear": {"density": DENSITIES, "lambda": LAMBDAS, **NORM, "seeds": 3},
    "breadcrumbs": {"density": [0.7, 0.9], "gamma": [0.01, 0.05, 0.1], "lambda": LAMBDAS, **NORM},
    "breadcrumbs_ties": {"density": [0.9], "gamma": [0.01, 0.05], "lambda": LAMBDAS, **NORM},
    "della": {"density": [0.3, 0.5, 0.7], "epsilon": [0.05, 0.15], "lambda": LAMBDAS, "seeds": 3},
    "della_linear": {"density": [0.3, 0.5, 0.7], "lambda": LAMBDAS, **NORM, "seeds": 3},
    "sce": {"select_topk": [0.1, 0.3, 1.0]},
    "regmean": {"alpha": [0.1, 0.5, 0.9]},
    "multislerp": {}, "karcher": {}, "model_stock": {}, "fisher": {}, "ram": {}, "ramplus_tl": {},
}
QUICK_GRIDS: dict[str, dict[str, Any]] = {  # every method, as few points as the CI test's checks need
    "linear": {},
    "task_arithmetic": {"lambda": [0.0, 1.0]},
    "ties": {"density": [0.3, 1.0]},
    "dare_ties": {"density": [0.9, 0.1], **NORM, "seeds": 2},
    "dare_linear": {"density": [0.5], **NORM, "seeds": 2},
    "breadcrumbs": {"density": [0.9], **NORM}, "breadcrumbs_ties": {"density": [0.9], **NORM},
    "della": {"density": [0.5], "seeds": 2}, "della_linear": {"density": [0.5], **NORM, "seeds": 1},
    "sce": {}, "regmean": {}, "multislerp": {}, "karcher": {}, "model_stock": {}, "fisher": {}, "ram": {},
    "ramplus_tl": {},
}
SUM_GRID = {"dare_ties": {"density": DENSITIES, "lambda": SUM_LAMBDAS, "normalize": False, "seeds": 3}}
QUICK_SUM_GRID = {"dare_ties": {"density": [0.9, 0.1], "lambda": [0.4], "normalize": False, "seeds": 1}}
PAIRWISE = "slerp"  # exactly two sources: one sweep per pair of experts
NOT_SWEPT = {  # registered methods this benchmark leaves out, and why (the results page lists them)
    "nuslerp": "two sources, like slerp, with per-source weights instead of t: slerp's pairs cover the question",
    "nearswap": "the base and one source: no merge of experts",
    "arcee_fusion": "the base and one source: no merge of experts",
    "lorahub": "combines LoRA adapters; the zoo's experts are full fine-tunes",
}
SLERP_T = [0.0, 0.25, 0.5, 0.75, 1.0]
QUICK_SLERP_T = [0.0, 0.5, 1.0]
ALL = "all experts"  # the section of the main sweep
SUMMED = "all experts, DARE-TIES summed"  # DARE-TIES with normalize: false (see the module docstring)
CSV_SPREADS = ("val", "test")


def sweep_configs(zoo: Zoo, args: argparse.Namespace) -> list[tuple[str, SweepConfig]]:
    """``(section, config)`` of every sweep: all experts, then one SLERP sweep per pair of experts."""
    validation, test = zoo_bench.evaluators(zoo, args.limit, args.test_limit)
    work = Path(args.work)
    experts = dict(zoo.experts)
    common = dict(base=str(zoo.base), seed=args.seed, device=args.device, max_points=1000)
    sources = [str(p) for p in experts.values()]
    configs = [(ALL, SweepConfig(name="methods", sources=sources, evaluator=validation,
                                 test_evaluator=test, sweep=QUICK_GRIDS if args.quick else GRIDS,
                                 calibration=zoo_bench.calibration_file(zoo, work / "calibration.jsonl"),
                                 out=str(work / "methods"), **common)),
               (SUMMED, SweepConfig(name="dare_summed", sources=sources, evaluator=validation, test_evaluator=test,
                                    sweep=QUICK_SUM_GRID if args.quick else SUM_GRID, out=str(work / "dare_summed"),
                                    **common))]
    pairs = list(itertools.combinations(experts, 2))[: 1 if args.quick else args.pairs]
    for a, b in pairs:
        tasks = [lm_eval_name(a), lm_eval_name(b)]
        configs.append((f"slerp {a}+{b}", SweepConfig(
            name=f"slerp_{a}_{b}", sources=[str(experts[a]), str(experts[b])], evaluator={**validation, "tasks": tasks},
            test_evaluator={**test, "tasks": tasks}, sweep={PAIRWISE: {"t": QUICK_SLERP_T if args.quick else SLERP_T}},
            out=str(work / f"slerp_{a}_{b}"), **common)))
    return configs


def load_summary(config: SweepConfig) -> SweepSummary:
    return summarize(optuna.load_study(study_name=config.name, storage=config.storage_url))


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


def csv_rows(section: str, summary: SweepSummary) -> list[dict[str, str]]:
    """One row per point: its parameters (label and JSON), seeds, val/test objective mean and std, each task's mean
    accuracy, and ``picked`` = 1 for the point validation picks for its method."""
    rows = []
    for r in summary.points:
        row = {"section": section, "method": r.point.method, "point": r.point.label,
               "params": json.dumps(r.point.params), "n_seeds": str(r.val.n),
               "picked": str(int(summary.picks.get(r.point.method) is r))}
        for split, spread in zip(CSV_SPREADS, (r.val, r.test)):
            row[f"{split}_mean"], row[f"{split}_std"] = _num(spread.mean), _num(spread.std)
        for name in zoo_bench.task_metrics(summary.metrics):
            row[f"val {name}"] = _num(r.val_metrics[name].mean)
            row[f"test {name}"] = _num(r.test_metrics[name].mean)
        rows.append(row)
    return rows


def _cell(spread: Spread) -> str:
    if spread.mean is None:
        return "–"
    return f"{spread.mean:.3f}" if spread.n < 2 else f"{spread.mean:.3f} ± {spread.std:.3f}"


def picks_table(sections: Sequence[tuple[str, SweepSummary]]) -> str:
    """Each method's validation pick side by side, sorted by its validation mean."""
    picks = [(section, r) for section, s in sections for r in s.picks.values()]
    picks.sort(key=lambda sr: -(sr[1].val.mean or -math.inf))
    return markdown_table(["sweep", "method", "picked point (on validation)", "seeds", "validation", "test"],
                          [[section, r.point.method, r.point.label, str(r.val.n), _cell(r.val), _cell(r.test)]
                           for section, r in picks])


def points_table(summary: SweepSummary, method: str) -> str:
    results = [r for r in summary.points if r.point.method == method]
    tasks = zoo_bench.task_metrics(summary.metrics)
    return markdown_table(["point", "seeds", "validation", "test", *(f"test {m}" for m in tasks)],
                          [[("**" + r.point.label + "**") if summary.picks.get(method) is r else r.point.label,
                            str(r.val.n), _cell(r.val), _cell(r.test),
                            *(_cell(r.test_metrics[m]) for m in tasks)] for r in results])


def _line(summary: SweepSummary, method: str, axis: str) -> list[PointResult]:
    """The points of ``method`` along ``axis``, its other hyperparameters at the method's pick."""
    pick = summary.picks[method].point.params
    return [r for r in summary.points if r.point.method == method
            and all(v == pick[n] for n, v in r.point.values if n != axis)]


def _axes(summary: SweepSummary, method: str) -> list[str]:
    points = [r.point for r in summary.points if r.point.method == method]
    return [n for n, _ in points[0].values if len({p.params[n] for p in points}) > 1]


def _band(ax: Any, x: Sequence[float], spreads: Sequence[Spread], **style: Any) -> None:
    mean = np.array([np.nan if s.mean is None else s.mean for s in spreads])
    std = np.array([0.0 if s.std is None else s.std for s in spreads])
    (line,) = ax.plot(x, mean, marker="o", **style)
    if std.max(initial=0.0) > 0:
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())


def plot(sections: Sequence[tuple[str, SweepSummary]], summed: SweepSummary | None, path: Path) -> None:
    """One panel per (method, swept hyperparameter) of the main sweep (validation solid, test dashed, bands = ±
    std over seeds), the DARE drop-rate curves (``summed``: the :data:`SUMMED` section, if run), the SLERP t curves
    per pair, and every method's pick."""
    main = sections[0][1]
    panels = [(m, a) for m in main.picks for a in _axes(main, m) if not m.startswith("dare_")]
    n = len(panels) + 3
    cols = 4
    fig = Figure(figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)))
    for k, (method, axis) in enumerate(panels):
        ax = fig.add_subplot(math.ceil(n / cols), cols, k + 1)
        line = _line(main, method, axis)
        x = [float(r.point.params[axis]) for r in line]
        _band(ax, x, [r.val for r in line], label="validation", color="C0")
        _band(ax, x, [r.test for r in line], label="test", color="C1", linestyle="--")
        held = ", ".join(f"{n}={v}" for n, v in main.picks[method].point.params.items() if n != axis)
        ax.set(xlabel=axis, ylabel="mean acc", title=f"{method}" + (f"\n({held})" if held else ""))
        ax.legend(fontsize="x-small")
    ax = fig.add_subplot(math.ceil(n / cols), cols, len(panels) + 1)
    curves = [(main, m, m) for m in ("dare_ties", "dare_linear") if m in main.picks]
    curves += [(summed, "dare_ties", "dare_ties summed")] if summed is not None and summed.picks else []
    for c, (summary, method, label) in enumerate(curves):
        line = _line(summary, method, "density")
        x = [1 - float(r.point.params["density"]) for r in line]
        lam = summary.picks[method].point.params.get("lambda")
        _band(ax, x, [r.val for r in line], label=f"{label} val (λ={lam})", color=f"C{c}")
        _band(ax, x, [r.test for r in line], label=f"{label} test", color=f"C{c}", linestyle="--")
    ax.set(xlabel="drop rate p", ylabel="mean acc", title="DARE: drop rate (bands ± std over seeds)")
    ax.legend(fontsize="x-small")
    ax = fig.add_subplot(math.ceil(n / cols), cols, len(panels) + 2)
    for c, (section, summary) in enumerate((sec, sm) for sec, sm in sections if sec not in (ALL, SUMMED)):
        line = [r for r in summary.points if r.point.method == "slerp"]
        x = [float(r.point.params["t"]) for r in line]
        _band(ax, x, [r.val for r in line], label=f"{section} val", color=f"C{c}")
        _band(ax, x, [r.test for r in line], color=f"C{c}", linestyle="--")
    ax.set(xlabel="t", ylabel="mean acc (pair's tasks)", title="SLERP pairs (t=0, 1: one expert)")
    ax.legend(fontsize="x-small")
    ax = fig.add_subplot(math.ceil(n / cols), cols, len(panels) + 3)
    picks = sorted(main.picks.values(), key=lambda r: r.val.mean or -math.inf)
    y = np.arange(len(picks))
    for offset, split in ((-0.2, "val"), (0.2, "test")):
        spreads = [r.val if split == "val" else r.test for r in picks]
        ax.barh(y + offset, [s.mean or np.nan for s in spreads], height=0.4, label=split,
                xerr=[s.std or 0.0 for s in spreads], capsize=2)
    ax.set_yticks(y, [r.point.method for r in picks], fontsize="x-small")
    ax.set(xlabel="mean acc", title="each method's pick (on validation)")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    _save(fig, path)


def curve(summary: SweepSummary, method: str, axis: str) -> str:
    """``method``'s test objective along ``axis`` (other hyperparameters at its pick), e.g. ``0.1: 0.47 ± 0.02``."""
    if method not in summary.picks or axis not in _axes(summary, method):
        return f"{method}: not swept over {axis}"
    held = ", ".join(f"{n}={v}" for n, v in summary.picks[method].point.params.items() if n != axis)
    points = "; ".join(f"{r.point.params[axis]}: {_cell(r.test)}" for r in _line(summary, method, axis))
    return (f"{method}{f' ({held})' if held else ''}, test by {axis}: {points}; validation picks "
            f"{summary.picks[method].point.label}")


def shapes(summary: SweepSummary, summed: SweepSummary | None) -> list[str]:
    """The curves the papers' claims are about: DARE's drop rate (p = 1 - density; DARE-TIES also summed), TIES'
    density, task arithmetic's lambda, each as a line of test objectives."""
    lines = [f"- {curve(summary, m, a)}" for m, a in (("dare_ties", "density"), ("dare_linear", "density"),
                                                       ("ties", "density"), ("task_arithmetic", "lambda"))]
    if summed is not None:
        lines.insert(1, f"- summed: {curve(summed, 'dare_ties', 'density')}")
    return lines


def write_results(out: Path, zoo: Zoo, args: argparse.Namespace, started: float,
                  sections: Sequence[tuple[str, SweepSummary]], n_trials: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "method_sweep_quick" if args.quick else "method_sweep"
    rows = [row for section, summary in sections for row in csv_rows(section, summary)]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    main, summed = sections[0][1], dict(sections).get(SUMMED)
    plot(sections, summed, out / f"{stem}.png")
    docs = f"{args.limit} validation docs per task (seeded subset)" if args.limit else "every validation doc"
    tests = f"{args.test_limit} test docs per task" if args.test_limit else "every test doc"
    lines = zoo_bench.header("Method sweep: every merge method over its main hyperparameters", zoo, started, [
        f"- {n_trials} trials (points x seeds), {docs}, {tests}; objective = mean accuracy over the experts' "
        "tasks (SLERP pairs: over the pair's two tasks); seeds of DARE/DELLA: the recipe seeds "
        f"{args.seed}, {args.seed + 1}, ...",
        "- ranked on validation (mean over seeds); test scored for the report only; `mean ± std` over seeds",
        f"- studies (resumable, each with its `evomerge report`): `{args.work}`",
        "- not swept: " + "; ".join(f"{m} ({why})" for m, why in NOT_SWEPT.items())])
    lines += ["## Each method's pick, side by side", "", picks_table(sections), "", f"![method sweep]({stem}.png)", ""]
    lines += ["## Shapes (computed from the table)", "", *shapes(main, summed), ""]
    for section, summary in sections:
        for method in dict.fromkeys(r.point.method for r in summary.points):
            title = {ALL: method, SUMMED: f"{method} (summed: normalize false)"}.get(section, section)
            lines += [f"## {title}", "", points_table(summary, method), ""]
    lines += [f"Bold: the point validation picks. The {len(main.points)} points of the main sweep are in "
              f"`{stem}.csv` (one row per point; `picked` = 1 marks each method's validation pick).", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = zoo_bench.arg_parser(__doc__, "the mini zoo and small grids (the CI test)")
    parser.add_argument("--pairs", type=int, default=3, help="SLERP pairs of experts (default 3; quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = zoo_bench.parse_args(parser, argv, "method_sweep", {"limit": (40, 5), "test_limit": (100, 10)})
    started = time.time()
    zoo = zoo_bench.find_zoo(args.zoo, args.quick)
    configs = sweep_configs(zoo, args)
    for section, config in configs:
        print(f"== sweep {section}", flush=True)
        run_sweep(config, progress=not args.quick)
    sections = [(section, load_summary(config)) for section, config in configs]
    n_trials = sum(r.val.n for _, s in sections for r in s.points)
    write_results(Path(args.out), zoo, args, started, sections, n_trials)
    print(f"wrote {args.out}/method_sweep{'_quick' if args.quick else ''}.md ({n_trials} trials, "
          f"{(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
