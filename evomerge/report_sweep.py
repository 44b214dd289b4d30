"""The report of an ``evomerge sweep`` run (:func:`evomerge.report.write_report` dispatches here).

Files written into the report dir:

- ``summary.md``: what validation picks per method and overall and how the picks did on test (side by side), then
  one table per method: a row per point, columns = validation / test objective and each metric, ``mean ± std``
  over seeds for stochastic methods (``n`` says how many seeds completed);
- ``sweep.csv`` (every point) and ``picks.csv`` (each method's pick): the same numbers, mean and std in their own
  columns, hyperparameters as ``param:<name>``;
- ``sweep_<method>_<param>.png``: validation metrics and objective (and the test objective, dashed) against each
  swept hyperparameter, the method's other hyperparameters held at its pick, bands = ± std over seeds;
- ``sweep_<method>_heatmap.png``: for a method swept over exactly two hyperparameters, the mean validation and test
  objective over the grid;
- ``sweep_picks.png``: every method's pick, validation and test objective, error bars ± std over seeds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
from matplotlib.figure import Figure

from evomerge.report import _save, markdown_table
from evomerge.search.sweep import PointResult, Spread, SweepSummary, summarize

MISSING = "–"


def _cell(spread: Spread) -> str:
    if spread.mean is None:
        return MISSING
    return f"{spread.mean:.4g}" if spread.n < 2 else f"{spread.mean:.4g} ± {spread.std:.2g}"


def _axes(summary: SweepSummary, method: str) -> list[str]:
    """The hyperparameters a method's grid varies (more than one value), in the grid's order."""
    points = [r.point for r in summary.points if r.point.method == method]
    names = [n for n, _ in points[0].values]
    return [n for n in names if len({p.params[n] for p in points}) > 1]


def _point_names(summary: SweepSummary, method: str) -> list[str]:
    return [n for n, _ in next(r.point for r in summary.points if r.point.method == method).values]


def _columns(summary: SweepSummary) -> list[tuple[str, str]]:
    """(header, key) of the score columns: objectives, then each metric on validation and test."""
    cols = [("val objective", "val"), ("test objective", "test")]
    for name in summary.metrics:
        cols += [(f"val {name}", f"val:{name}"), (f"test {name}", f"test:{name}")]
    return cols


def _spread(result: PointResult, key: str) -> Spread:
    if key == "val":
        return result.val
    if key == "test":
        return result.test
    split, _, name = key.partition(":")
    metrics = result.val_metrics if split == "val" else result.test_metrics
    return metrics.get(name, Spread(None, None, 0))


def _table(summary: SweepSummary, results: Sequence[PointResult], params: Sequence[str], *,
           with_method: bool) -> str:
    cols = _columns(summary)
    header = [*(["method", "point"] if with_method else []), *params, "n", *(h for h, _ in cols)]
    rows = [[*([r.point.method, r.point.label] if with_method else []),
             *(str(r.point.params.get(p, MISSING)) for p in params),
             str(r.val.n), *(_cell(_spread(r, k)) for _, k in cols)] for r in results]
    return markdown_table(header, rows)


def _write_csv(summary: SweepSummary, results: Sequence[PointResult], path: Path) -> None:
    params = list(dict.fromkeys(n for r in results for n, _ in r.point.values))
    keys = [k for _, k in _columns(summary)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *(f"param:{p}" for p in params), "n", "trials",
                         *(f"{k}_{s}" for k in keys for s in ("mean", "std")), "errors"])
        for r in results:
            stats = [v for k in keys for v in (_spread(r, k).mean, _spread(r, k).std)]
            writer.writerow([r.point.method, *(r.point.params.get(p, "") for p in params), r.val.n,
                             " ".join(map(str, r.trials)), *("" if v is None else repr(v) for v in stats),
                             "; ".join(r.errors)])


def _band(ax: object, x: Sequence[float], spreads: Sequence[Spread], label: str, **style: object) -> None:
    mean = np.array([np.nan if s.mean is None else s.mean for s in spreads])
    std = np.array([np.nan if s.std is None else s.std for s in spreads])
    ax.plot(x, mean, marker="o", label=label, **style)  # type: ignore[attr-defined]
    if np.nanmax(std, initial=0.0) > 0:
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)  # type: ignore[attr-defined]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_axis(summary: SweepSummary, method: str, axis: str, path: Path) -> None:
    """Scores against ``axis``, the method's other hyperparameters at its pick (module docstring)."""
    pick = summary.picks[method].point.params
    line = [r for r in summary.points if r.point.method == method
            and all(v == pick[n] for n, v in r.point.values if n != axis)]
    values = [r.point.params[axis] for r in line]
    x = [float(v) for v in values] if all(_is_number(v) for v in values) else list(range(len(values)))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name in summary.metrics:
        _band(ax, x, [r.val_metrics.get(name, Spread(None, None, 0)) for r in line], f"val {name}", linewidth=1)
    _band(ax, x, [r.val for r in line], "val objective", linewidth=2.5, color="black")
    _band(ax, x, [r.test for r in line], "test objective", linewidth=2, color="black", linestyle="--")
    if not all(_is_number(v) for v in values):
        ax.set_xticks(x, [str(v) for v in values])
    held = ", ".join(f"{n}={v}" for n, v in pick.items() if n != axis)
    ax.set(xlabel=axis, ylabel="score", title=f"{method}" + (f" ({held})" if held else ""))
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_heatmap(summary: SweepSummary, method: str, axes: Sequence[str], path: Path) -> None:
    """Mean validation and test objective over a two-hyperparameter grid."""
    results = [r for r in summary.points if r.point.method == method]
    rows = list(dict.fromkeys(r.point.params[axes[0]] for r in results))
    cols = list(dict.fromkeys(r.point.params[axes[1]] for r in results))
    fig = Figure(figsize=(10, 4))
    for k, (split, title) in enumerate((("val", "validation"), ("test", "test"))):
        grid = np.full((len(rows), len(cols)), np.nan)
        for r in results:
            value = _spread(r, split).mean
            grid[rows.index(r.point.params[axes[0]]), cols.index(r.point.params[axes[1]])] = (
                np.nan if value is None else value)
        ax = fig.add_subplot(1, 2, k + 1)
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", color="white", fontsize="small")
        ax.set(xlabel=axes[1], ylabel=axes[0], title=f"{method}: {title} objective")
        fig.colorbar(image, ax=ax)
    _save(fig, path)


def plot_picks(summary: SweepSummary, path: Path) -> None:
    """Each method's pick: validation and test objective side by side, ± std over seeds."""
    picks = list(summary.picks.values())
    fig = Figure(figsize=(max(5.0, 1.2 * len(picks) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(picks))
    for offset, split in ((-0.2, "val"), (0.2, "test")):
        spreads = [_spread(r, split) for r in picks]
        ax.bar(x + offset, [np.nan if s.mean is None else s.mean for s in spreads], width=0.4, label=split,
               yerr=[0.0 if s.std is None else s.std for s in spreads], capsize=3)
    ax.set_xticks(x, [f"{r.point.method}\n{r.point.label}" for r in picks], fontsize="small")
    ax.set(ylabel="objective", title="each method's pick (chosen on validation)")
    ax.legend()
    _save(fig, path)


def write_sweep_report(study: optuna.Study, out_dir: Path, *, title: str | None = None) -> Path:
    """Write ``summary.md``, ``sweep.csv``, ``picks.csv`` and the plots (module docstring); returns ``summary.md``."""
    summary = summarize(study)
    methods = list(dict.fromkeys(r.point.method for r in summary.points))
    lines = [f"# {title or f'evomerge sweep {study.study_name}'}", "",
             f"- Study: `{study.study_name}` (kind sweep); {len(summary.points)} points, "
             f"{sum(r.val.n for r in summary.points)} completed trials",
             "- Points are ranked on the validation objective (mean over seeds); the test split is scored for this "
             "report only.", ""]
    if summary.overall is not None:
        best = summary.overall
        lines += [f"Validation picks **{best.point.method} ({best.point.label})**: validation {_cell(best.val)}, "
                  f"test {_cell(best.test)}.", ""]
    picks = list(summary.picks.values())
    lines += ["## Each method's pick", "", _table(summary, picks, [], with_method=True) if picks else
              "No completed point yet.", ""]
    if picks:
        plot_picks(summary, out_dir / "sweep_picks.png")
        lines += ["![picks](sweep_picks.png)", ""]
    for method in methods:
        results = [r for r in summary.points if r.point.method == method]
        lines += [f"## {method}", "", _table(summary, results, _point_names(summary, method), with_method=False), ""]
        lines += [f"- {r.point.label}: {e}" for r in results for e in r.errors]
        if method not in summary.picks:
            continue
        axes = _axes(summary, method)
        for axis in axes:
            name = f"sweep_{method}_{axis}.png"
            plot_axis(summary, method, axis, out_dir / name)
            lines += ["", f"![{method} {axis}]({name})"]
        if len(axes) == 2:
            name = f"sweep_{method}_heatmap.png"
            plot_heatmap(summary, method, axes, out_dir / name)
            lines += ["", f"![{method} heatmap]({name})"]
        lines.append("")
    _write_csv(summary, summary.points, out_dir / "sweep.csv")
    _write_csv(summary, picks, out_dir / "picks.csv")
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
