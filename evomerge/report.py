"""Report of an evomerge study: tables and plots of a finished (or running) Optuna study.

:func:`write_report` writes into ``out_dir``:

- ``summary.md``: the study, its trial counts and wall time, the best trial (with several objectives: the
  Pareto-optimal trials), the compact table "best vs baselines" (:func:`comparison_table`: the objective and one
  metric per task on validation and test, 3 decimals, ``± stderr`` on test where the evaluator computed it, the
  difference to the best source alone), the best recipe as YAML, the parameter importances
  (:func:`importance_section`), links to the plots and how to open the study in optuna-dashboard;
- ``trials.csv``: one row per trial (number, state, kind, objective value(s), with a space's L1 penalty the
  unpenalized score and the penalty, every metric, stderr, timings, error);
- ``history.png``: the objective of every trial with the best-so-far line, baselines as dashed horizontal lines;
- ``importances.png``: fANOVA parameter importances over the completed search trials (Hutter, Hoos & Leyton-Brown
  2014, "An Efficient Approach for Assessing Hyperparameter Importance", ICML), through
  :func:`optuna.importance.get_param_importances`;
- ``layers.png``: the value each layer gets from the best recipe (:func:`layer_table`; an MoE's router scale and
  dense layers, :func:`moe_layer_table`), or the layer path of a passthrough recipe;
- ``pareto.png`` (several objectives): the trials in objective space, the Pareto front highlighted.

"Best" is Optuna's best trial; with several objectives it is the Pareto-optimal trial with the highest first
objective (the one the search exports). Test-split results are read from a trial's user_attrs ``test_metrics`` /
``test_objective`` or, since finished trials are read-only in Optuna, from the study's user_attr
``test:<trial number>`` = ``{"metrics": {...}, "objective": value}``. Trials without a ``kind`` count as search trials.
Baselines the search space cannot express are scored beside the study as user_attrs ``reference:<label>`` =
``{"recipe", "metrics", "values", "test_metrics", "test_objective", ...}`` and get rows of their own in the table.

Plots are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch) at 100 dpi.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.engine.stacking import layer_plan
from evomerge.methods import Param, get_method
from evomerge.outdir import building, refuse_symlink
from evomerge.recipe import AnyRecipe, MoeRecipe, Recipe, StackRecipe, layer_values, resolve_params
from evomerge.recipe.schema import model_labels
from evomerge.search import trials as records
from evomerge.search.storage import mask_url, unmasked_for_libpq
from evomerge.search.trials import best_trials, is_baseline, quiet_optuna, scored_on_test, trial_kind

DPI = 100
MISSING = "—"
#: One representative tensor per filter of decoder layer ``i`` (Llama naming); per-filter values get one row each.
FILTER_PROBES = {"self_attn": "model.layers.{i}.self_attn.q_proj.weight", "mlp": "model.layers.{i}.mlp.up_proj.weight"}
#: How trial states read in the summary's counts (others: the state's name in lower case).
STATE_WORDS = {TrialState.FAIL: "failed"}
#: Largest heatmap (rows × layers) whose cells are annotated with their values.
MAX_ANNOTATED_CELLS = 800
#: Parameters listed in the summary's importance table (all of them are in importances.png).
MAX_IMPORTANCE_ROWS = 15


# ----------------------------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class RunStorage:
    """Where a run dir's study lives.

    ``kind`` is ``"sqlite"`` (``study.db``), ``"journal"`` (``study.log``, an Optuna journal file) or ``"url"``
    (the ``storage`` URL of ``run.json``, e.g. PostgreSQL shared by several workers); ``location`` is the storage
    URL, or the journal file's path.
    """

    kind: str
    location: str
    study_name: str | None

    def open(self) -> BaseStorage:
        if self.kind == "journal":
            return JournalStorage(JournalFileBackend(self.location))
        return RDBStorage(unmasked_for_libpq(self.location))  # run.json's URL has no password: PGPASSWORD has it

    def dashboard_command(self) -> str:
        """The optuna-dashboard command for this storage (a URL's password masked)."""
        return f"optuna-dashboard {mask_url(self.location)}"


def locate_storage(run_dir: Path) -> RunStorage:
    """The storage of ``run_dir``: ``study.db``, else ``study.log``, else the ``storage`` URL in ``run.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist; pass the output dir of `evomerge search`")
    meta_path = run_dir / "run.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}); it should hold {{study_name, storage}}") from None
    name = meta.get("study_name")
    db, log = run_dir / "study.db", run_dir / "study.log"
    if db.is_file():
        return RunStorage("sqlite", f"sqlite:///{db.resolve()}", name)
    if log.is_file():
        return RunStorage("journal", str(log.resolve()), name)
    url = meta.get("storage")
    if url and not (url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()):
        return RunStorage("url", url, name)
    raise FileNotFoundError(
        f"no study in {run_dir}: expected study.db (SQLite), study.log (Optuna journal file) or run.json with the"
        f" 'storage' URL of a database that exists; point to the run dir written by `evomerge search`"
    )


def load_study(run_dir: Path) -> optuna.Study:
    """The study of a run dir (see :func:`locate_storage`); its name comes from ``run.json``, or is the only study
    in the storage."""
    where = locate_storage(run_dir)
    storage = where.open()
    names = optuna.get_all_study_names(storage)
    name = where.study_name
    if name is None and len(names) == 1:
        name = names[0]
    if name not in names:
        wanted = f"study {name!r} is" if name else "a single study is"
        raise ValueError(
            f"{wanted} expected in {mask_url(where.location)}, which holds {names or 'no study'}; "
            f"set 'study_name' in {Path(run_dir) / 'run.json'}"
        )
    return optuna.load_study(study_name=name, storage=storage)


# ------------------------------------------------------------------------------------------ trial data




def kind_label(kind: str) -> str:
    """A short label of a trial kind: ``baseline:source:/runs/zoo/expert_a`` -> ``source: expert_a``,
    ``baseline:uniform`` -> ``uniform``, ``soup:3`` -> ``soup: 3``."""
    head, _, tail = kind.removeprefix("baseline:").partition(":")
    return f"{head}: {Path(tail).name or tail}" if tail else head


def objective_names(study: optuna.Study) -> list[str]:
    """Column names of the objective values: ``objective`` (one), ``objective: <metric>`` (several)."""
    n = len(study.directions)
    if n == 1:
        return ["objective"]
    names = records.objective_metric_names(study)
    names = names if names is not None and len(names) == n else [str(i) for i in range(n)]
    return [f"objective: {name}" for name in names]








@dataclass(frozen=True)
class Column:
    """One column of the trial tables: a header and how to read its value off a trial."""

    header: str
    get: Callable[[FrozenTrial], Any]


def _metric_names(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for d in dicts for name in d))


def value_columns(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[Column]:
    """Objective value(s), validation metrics, test objective and test metrics (when any trial has them), timings."""
    columns = [
        Column(name, lambda t, i=i: t.values[i] if t.values else None) for i, name in enumerate(objective_names(study))
    ]
    if has_penalty(trials):  # the space's L1 penalty: the objective is this score with the penalty folded in
        columns += [Column(SCORE_HEADER, records.trial_score), Column("penalty", records.trial_penalty)]
    val = _metric_names([records.trial_metrics(t) for t in trials])
    columns += [Column(f"val {m}", lambda t, m=m: records.trial_metrics(t).get(m)) for m in val]
    attrs = study.user_attrs
    tests = [scored_on_test(attrs, t) for t in trials]
    if any(objective is not None for objective, _ in tests):
        columns.append(Column("test objective", lambda t: scored_on_test(attrs, t)[0]))
    test = _metric_names([metrics for _, metrics in tests])
    stderr = set(_metric_names([records.test_stderr(attrs, t) for t in trials]))
    for m in test:
        columns.append(Column(f"test {m}", lambda t, m=m: scored_on_test(attrs, t)[1].get(m)))
        if m in stderr:  # the evaluator's standard error of that test metric (lm-eval's bootstrap / analytic)
            columns.append(Column(f"test {m} ±", lambda t, m=m: records.test_stderr(attrs, t).get(m)))
    if any(records.test_error(attrs, t) for t in trials):  # why a row has no test score
        columns.append(Column("test error", lambda t: records.test_error(attrs, t)))
    columns += [
        Column("merge s", lambda t: records.trial_seconds(t)[0]),
        Column("eval s", lambda t: records.trial_seconds(t)[1]),
    ]
    return columns


SCORE_HEADER = "score (unpenalized)"


def has_penalty(trials: Sequence[FrozenTrial]) -> bool:
    """Whether any trial's objective includes a space's L1 penalty (it then stores its unpenalized score)."""
    return any(records.trial_score(t) is not None for t in trials)


def wall_seconds(trials: Sequence[FrozenTrial]) -> float | None:
    """Seconds from the first trial's start to the last finished trial's end (None before any finished)."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def format_seconds(seconds: float) -> str:
    """``4.2 s``, ``12 min 03 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _cell(value: Any) -> str:
    """A Markdown table cell: floats to 6 significant digits, lists joined, missing values as an em dash."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|")


def task_metrics(names: Sequence[str], objective: Sequence[str]) -> list[str]:
    """One metric per task (the part of a metric name before its first ``/``; a name without one is a task of its
    own), for the compact table: the task's objective metric if it has one, else its first metric. lm-eval reports
    several per task (``acc`` and ``acc_norm``, ``exact_match,strict-match`` and ``,flexible-extract``) that tell
    nearly the same; the CSV keeps them all."""
    tasks: dict[str, list[str]] = {}
    for name in names:
        tasks.setdefault(name.split("/", 1)[0], []).append(name)
    return [next((m for m in members if m in objective), members[0]) for members in tasks.values()]


def _number(value: Any) -> str:
    """A compact table's number: 3 decimals (4 significant digits from 1e5 on), the missing mark if absent."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _cell(value)
    return f"{value:.4g}" if abs(value) >= 1e5 else f"{value:.3f}"


def _with_stderr(value: Any, stderr: Any) -> str:
    return _number(value) if stderr is None or value is None else f"{_number(value)} ± {_number(stderr)}"


def _delta(value: Any, reference: Any) -> str:
    if value is None or reference is None:
        return MISSING
    return f"{value - reference:+.3f}"


def source_alone(trial: FrozenTrial) -> bool:
    """Whether a row is one source alone: a ``baseline:source:`` trial or a ``reference:source:`` reference."""
    kind = trial_kind(trial)
    return kind.removeprefix(records.BASELINE_PREFIX).removeprefix(records.REFERENCE_PREFIX).startswith("source:")


def best_source(study: optuna.Study, rows: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The best source-alone row (:func:`source_alone`) on the (first) validation objective."""
    sources = [t for t in rows if source_alone(t) and t.values]
    sign = records.direction_sign(study)
    return max(sources, key=lambda t: sign * t.values[0], default=None)


def summary_columns(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[Column]:
    """The compact table's columns: the validation objective(s), one validation metric per task (a single-metric
    objective is not repeated), the test objective and one test metric per task with ``± stderr`` where the evaluator
    computed one, why a row has no test score, and the difference to the best source alone (validation, test)."""
    attrs = study.user_attrs
    objective = records.objective_metric_names(study) or []
    repeated = objective if len(objective) == 1 or len(study.directions) > 1 else []
    columns = [Column(f"val {name}", lambda t, i=i: _number(t.values[i] if t.values else None))
               for i, name in enumerate(objective_names(study))]
    if has_penalty(trials):
        columns.append(Column(f"val {SCORE_HEADER}", lambda t: _number(records.trial_score(t))))
    val = task_metrics(_metric_names([records.trial_metrics(t) for t in trials]), objective)
    columns += [Column(f"val {m}", lambda t, m=m: _number(records.trial_metrics(t).get(m)))
                for m in val if m not in repeated]
    tests = [scored_on_test(attrs, t) for t in trials]
    if any(score is not None for score, _ in tests):
        single = objective[0] if len(objective) == 1 else None

        def test_objective(t: FrozenTrial) -> str:
            stderr = records.test_stderr(attrs, t).get(single) if single else None
            return _with_stderr(scored_on_test(attrs, t)[0], stderr)

        columns.append(Column("test objective", test_objective))
    test = task_metrics(_metric_names([metrics for _, metrics in tests]), objective)
    columns += [Column(f"test {m}", lambda t, m=m: _with_stderr(scored_on_test(attrs, t)[1].get(m),
                                                                 records.test_stderr(attrs, t).get(m)))
                for m in test if m not in repeated]
    if any(records.test_error(attrs, t) for t in trials):
        columns.append(Column("test error", lambda t: _cell(records.test_error(attrs, t))))
    return columns


def comparison_table(
    study: optuna.Study, trials: Sequence[FrozenTrial], best: Sequence[FrozenTrial]
) -> tuple[list[str], list[list[str]], FrozenTrial | None]:
    """The compact "best vs baselines" table (:func:`summary_columns`, then ``Δ val`` / ``Δ test``: the objective
    minus the best source's) and the best source: one row for the best (or each Pareto-optimal) trial of ``best``,
    then one per completed baseline trial (uniform soup, defaults, each source alone, ...) in trial order, then the
    references. Every metric and timing is in ``trials.csv``."""
    if greedy := records.greedy(study):
        rows = [(f"greedy soup (kept {len(greedy['kept'])} of {greedy['of']}: {', '.join(greedy['kept'])})", t)
                for t in best]
    else:
        tag = "best" if len(study.directions) == 1 else "pareto"
        rows = [(f"{tag} ({kind_label(trial_kind(t))})", t) for t in best]
    rows += [(kind_label(trial_kind(t)), t) for t in trials if t.state == TrialState.COMPLETE and is_baseline(t)]
    rows += [(f"{kind_label(label)} (linear, outside the space)", t) for label, t in reference_trials(study)]
    columns = summary_columns(study, [t for _, t in rows])
    source = best_source(study, [t for _, t in rows])
    attrs = study.user_attrs
    if source is not None:
        columns += [
            Column("Δ val", lambda t: _delta(t.values[0] if t.values else None, source.values[0])),
            Column("Δ test", lambda t: _delta(scored_on_test(attrs, t)[0], scored_on_test(attrs, source)[0])),
        ]
    header = ["row", "trial", *(c.header for c in columns)]
    return header, [[label, f"#{t.number}" if t.number >= 0 else MISSING, *(c.get(t) for c in columns)]
                    for label, t in rows], source


def reference_trials(study: optuna.Study) -> list[tuple[str, FrozenTrial]]:
    """The study's references (user_attrs ``reference:<label>``: baselines scored beside the study because its space
    cannot express them) as detached trials (number -1) that the table columns can read, with their labels."""
    out = []
    for label, record in records.references(study.user_attrs).items():
        trial = records.reference_as_trial(label, record)
        if trial is not None:
            out.append((label, trial))
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_trials_csv(study: optuna.Study, trials: Sequence[FrozenTrial], path: Path) -> None:
    """``trials.csv``: number, state, kind, the :func:`value_columns`, duration (s) and error of every trial."""
    columns = [
        Column("number", lambda t: t.number),
        Column("state", lambda t: t.state.name),
        Column("kind", trial_kind),
        *value_columns(study, trials),
        Column("duration s", lambda t: t.duration.total_seconds() if t.duration else None),
        Column("error", records.trial_error),
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c.header for c in columns])
        for t in trials:
            values = (c.get(t) for c in columns)
            writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in values])


def trials_dataframe(study: optuna.Study) -> Any:
    """``study.trials_dataframe()`` (a pandas DataFrame: ``value_<objective>``, ``params_<name>``,
    ``user_attrs_val/<metric>``, ...) with the test-split scores added as columns ``test/objective``,
    ``test/<metric>``, ``test/<metric>/stderr`` and ``test/error``: Optuna keeps finished trials read-only, so the
    final test scoring stores them on the study (``test:<number>``) and this joins them back by trial number."""
    frame = study.trials_dataframe()
    if frame.empty:
        return frame
    attrs = study.user_attrs
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows: dict[str, dict[int, Any]] = {}
    for number, trial in by_number.items():
        objective, metrics = scored_on_test(attrs, trial)
        cells = {"test/objective": objective, **{f"test/{m}": v for m, v in metrics.items()},
                 **{f"test/{m}/stderr": v for m, v in records.test_stderr(attrs, trial).items()},
                 "test/error": records.test_error(attrs, trial)}
        for column, value in cells.items():
            if value is not None:
                rows.setdefault(column, {})[number] = value
    for column, values in rows.items():
        frame[column] = frame["number"].map(values)
    return frame


# -------------------------------------------------------------------------------------------- layers
def layer_table(recipe: Recipe | MoeRecipe, num_layers: int) -> tuple[list[str], np.ndarray]:
    """Row labels and the [rows, num_layers] matrix of the values each layer's tensors get from ``recipe``.

    Rows: for each source, each numeric per-source parameter the recipe sets (in the source or as a top-level
    default), then each numeric global parameter (``t``, ``lambda``, ...). A cell is the parameter's value at layer
    ``l`` as the engine resolves it (:func:`evomerge.recipe.resolve_params`): a gradient list interpolated linearly
    at position ``l / (L − 1)``, a per-filter mapping resolved for one representative tensor per filter
    (:data:`FILTER_PROBES`). A parameter whose values differ between filters gets one row per filter,
    labelled ``"<row> [<filter>]"``. Row labels: ``"<source>: <param>"`` (source: the model's last path component,
    its full path where two sources share one) or ``"<param>"``. An MoE recipe: :func:`moe_layer_table`.
    """
    if isinstance(recipe, MoeRecipe):
        return moe_layer_table(recipe, num_layers)
    if not isinstance(recipe, Recipe):
        raise ValueError("a layer stack has no per-layer parameters; its layer path is stacking.layer_plan")
    method = get_method(recipe.method)
    named = set(recipe.parameters).union(*(s.parameters for s in recipe.sources))
    params = [p for p in method.params if p.name in named and not p.is_bool]
    # filter -> layer -> the values the engine resolves for that filter's representative tensor at that layer
    resolved = {f: [resolve_params(recipe, method, probe.format(i=layer), num_layers) for layer in range(num_layers)]
                for f, probe in FILTER_PROBES.items()}

    def values(p: Param, source: int | None, f: str) -> np.ndarray:
        picked = (r.get(p.name, p.default) for r in resolved[f])
        cells = [v[source] if isinstance(v, list) and source is not None else v for v in picked]
        return np.array([np.nan if v is None else float(v) for v in cells], dtype=np.float64)

    names = model_labels([s.model for s in recipe.sources])
    specs = [(f"{names[i]}: {p.name}", p, i) for i in range(len(recipe.sources)) for p in params if p.per_source]
    specs += [(p.name, p, None) for p in params if not p.per_source]
    labels: list[str] = []
    rows: list[np.ndarray] = []
    for label, p, source in specs:
        by_filter = {f: values(p, source, f) for f in FILTER_PROBES}
        first = next(iter(by_filter.values()))
        if all(np.array_equal(first, v, equal_nan=True) for v in by_filter.values()):
            labels.append(label)
            rows.append(first)
        else:
            labels += [f"{label} [{f}]" for f in by_filter]
            rows += list(by_filter.values())
    return labels, np.array(rows, dtype=np.float64).reshape(len(rows), num_layers)


def moe_layer_table(recipe: MoeRecipe, num_layers: int) -> tuple[list[str], np.ndarray]:
    """The rows of an MoE recipe: ``router_scale`` at each layer (:func:`evomerge.recipe.layer_values`, as the build
    applies it), ``dense`` (1 where the layer holds one dense MLP merged from the experts, 0 where the experts' own
    MLPs) and, when the dense merge weighs the experts, ``<expert>: dense weight`` on the dense layers (NaN
    elsewhere)."""
    dense = recipe.dense_layers
    layers = set(dense.layers) if dense is not None else set()
    labels = ["router_scale", "dense"]
    rows = [layer_values(recipe.router_scale, num_layers), [float(i in layers) for i in range(num_layers)]]
    if dense is not None and dense.weights is not None:
        for label, weight in zip(model_labels([e.model for e in recipe.experts]), dense.weights):
            labels.append(f"{label}: dense weight")
            rows.append([weight if i in layers else np.nan for i in range(num_layers)])
    return labels, np.array(rows, dtype=np.float64)


# --------------------------------------------------------------------------------------------- plots
def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def plot_history(study: optuna.Study, trials: Sequence[FrozenTrial], path: Path) -> None:
    """Objective per trial (one marker per kind family: search, soup, ...) with the best-so-far line over the
    non-baseline trials; each baseline as a dashed horizontal line labelled with its kind. One panel per objective."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    runs = [t for t in complete if not is_baseline(t)]
    baselines = [t for t in complete if is_baseline(t)] + [t for _, t in reference_trials(study)]
    names = objective_names(study)
    fig = Figure(figsize=(7.5, 3.2 * len(names)))
    for i, (ax, name, direction) in enumerate(zip(fig.subplots(len(names), 1, squeeze=False)[:, 0], names,
                                                 study.directions)):
        for marker, family in zip("os^v", dict.fromkeys(trial_kind(t).split(":")[0] for t in runs)):
            group = [t for t in runs if trial_kind(t).split(":")[0] == family]
            ax.scatter([t.number for t in group], [t.values[i] for t in group], s=18, marker=marker, label=family)
        if runs:
            best = np.array([t.values[i] for t in runs], dtype=np.float64)
            best = (np.maximum if direction == StudyDirection.MAXIMIZE else np.minimum).accumulate(best)
            ax.step([t.number for t in runs], best, where="post", color="black", lw=1.2, label="best so far")
        for j, t in enumerate(baselines):
            ax.axhline(t.values[i], ls="--", lw=1, color=f"C{(j + 2) % 10}", label=kind_label(trial_kind(t)))
        ax.set_xlim(-0.5, max(t.number for t in trials) + 0.5)
        ax.set_xlabel("trial")
        ax.set_ylabel(name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{study.study_name}: optimization history")
    _save(fig, path)


@dataclass(frozen=True)
class Importances:
    """Parameter importances of a study: ``values`` ``{objective: {param: importance}}`` (empty when skipped, with
    the reason in ``skipped``), over ``n_trials`` completed search trials that share ``n_params`` parameters."""

    values: dict[str, dict[str, float]]
    n_trials: int
    n_params: int
    skipped: str | None = None

    @property
    def warning(self) -> str | None:
        """fANOVA fits a random forest to the trials: with fewer trials than parameters it cannot tell them apart."""
        if self.values and self.n_trials < self.n_params:
            return (f"only {self.n_trials} search trials for {self.n_params} parameters: too few to tell the "
                    "parameters apart, read these importances as noise")
        return None


def compute_importances(study: optuna.Study, trials: Sequence[FrozenTrial]) -> Importances:
    """fANOVA importances (:func:`optuna.importance.get_param_importances` with a seeded
    :class:`~optuna.importance.FanovaImportanceEvaluator`) of the parameters shared by the completed *search* trials,
    per objective: baselines, soup steps and references are left out (they are not samples of the search space; a
    baseline sits on its edge), whereas optuna-dashboard uses every trial. Skipped with fewer than 2 search trials,
    fewer than 2 shared parameters, or no variance to explain."""
    search = [t for t in trials if t.state == TrialState.COMPLETE and trial_kind(t) == records.SEARCH_KIND]
    shared = optuna.search_space.intersection_search_space(search) if search else {}
    n, k = len(search), len(shared)
    if n < 2:
        return Importances({}, n, k, f"skipped: {n} completed search trial(s); importances need at least 2")
    if k < 2:
        return Importances({}, n, k, f"skipped: the search trials share {k} parameter(s); importances need at least 2")
    try:
        with quiet_optuna():  # no "new study created in memory" line
            sub = optuna.create_study(directions=study.directions)
            sub.add_trials(search)
            out: dict[str, dict[str, float]] = {}
            for i, name in enumerate(objective_names(study)):
                out[name] = optuna.importance.get_param_importances(
                    sub, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=sorted(shared),
                    target=lambda t, i=i: t.values[i],
                )
    except RuntimeError as exc:  # fANOVA: zero total variance (every trial scored the same)
        return Importances({}, n, k, f"skipped: {exc}")
    return Importances(out, n, k)


def importance_section(importances: Importances) -> list[str]:
    """The summary's importance table (the :data:`MAX_IMPORTANCE_ROWS` most important parameters, 3 decimals),
    which trials it is computed over, and the warning when they are too few; ``[]`` when skipped."""
    if not importances.values:
        return []
    names = list(importances.values)
    first = importances.values[names[0]]
    ranked = sorted(first, key=first.__getitem__, reverse=True)
    rows = [[_cell(p), *(f"{importances.values[o][p]:.3f}" for o in names)]
            for p in ranked[:MAX_IMPORTANCE_ROWS]]
    lines = ["## Parameter importances", "",
             f"fANOVA (Optuna's `get_param_importances`, seed 0) over the {importances.n_trials} completed search "
             f"trials, {importances.n_params} parameters; baselines excluded (optuna-dashboard uses every trial, so "
             "its numbers differ).", ""]
    if importances.warning:
        lines += [f"**Warning:** {importances.warning}.", ""]
    lines += [markdown_table(["parameter", *(n if len(names) > 1 else "importance" for n in names)], rows), ""]
    if len(ranked) > MAX_IMPORTANCE_ROWS:
        lines += [f"{len(ranked) - MAX_IMPORTANCE_ROWS} more in importances.png.", ""]
    return lines


def plot_importances(importances: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Horizontal bars of each parameter's importance, one bar per objective, most important on top."""
    first = next(iter(importances.values()))
    params = sorted(first, key=first.__getitem__)
    height = 0.8 / len(importances)
    fig = Figure(figsize=(6.5, 1.2 + 0.32 * len(params) * len(importances)))
    ax = fig.subplots()
    y = np.arange(len(params))
    for k, (name, values) in enumerate(importances.items()):
        ax.barh(y + k * height, [values[p] for p in params], height=height, label=name)
    ax.set_yticks(y + height * (len(importances) - 1) / 2, params, fontsize=8)
    ax.set_xlabel("importance (fANOVA, normalized)")
    if len(importances) > 1:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_layers(recipe: AnyRecipe, num_layers: int, path: Path) -> str | None:
    """Heatmap of :func:`layer_table` with the values annotated, or the layer path of a passthrough recipe
    (output layer -> source layer, coloured by source, scale annotated); why nothing was drawn, else None."""
    if isinstance(recipe, StackRecipe):
        _plot_layer_path(recipe, num_layers, path)
        return None
    labels, matrix = layer_table(recipe, num_layers)
    if not labels:
        return "skipped: the best recipe sets no numeric per-layer parameter"
    fig = Figure(figsize=(min(16.0, 3.0 + 0.45 * num_layers), 1.2 + 0.4 * len(labels)))
    ax = fig.subplots()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=7)
    ax.set_xlabel("layer")
    if matrix.size <= MAX_ANNOTATED_CELLS:
        low, high = np.nanmin(matrix), np.nanmax(matrix)
        for (r, c), v in np.ndenumerate(matrix):
            bright = high > low and (v - low) / (high - low) > 0.6
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="black" if bright else "white")
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(f"best recipe ({'moe' if isinstance(recipe, MoeRecipe) else recipe.method}): value per layer")
    _save(fig, path)
    return None


def _plot_layer_path(recipe: StackRecipe, num_layers: int, path: Path) -> None:
    plan = layer_plan(recipe, {s.model: num_layers for s in recipe.slices})
    models = list(dict.fromkeys(m for m, _, _ in plan))
    fig = Figure(figsize=(min(16.0, 3.0 + 0.3 * len(plan)), 4.0))
    ax = fig.subplots()
    ax.plot(range(len(plan)), [j for _, j, _ in plan], color="0.7", lw=1)
    for model, name in zip(models, model_labels(models)):
        slots = [k for k, (m, _, _) in enumerate(plan) if m == model]
        ax.scatter(slots, [plan[k][1] for k in slots], s=30, label=name, zorder=3)
    for k, (_, j, scale) in enumerate(plan):
        if scale != 1.0:
            ax.annotate(f"×{scale:.2g}", (k, j), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=6)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("output layer")
    ax.set_ylabel("source layer")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("best recipe (passthrough): layer path")
    _save(fig, path)


def plot_pareto(study: optuna.Study, trials: Sequence[FrozenTrial], pareto: Sequence[FrozenTrial], path: Path) -> None:
    """Every completed trial in objective space (one panel per pair of objectives), the Pareto-optimal ones
    highlighted (and joined, for two objectives), baselines labelled."""
    names = objective_names(study)
    pairs = list(combinations(range(len(names)), 2))
    front = {t.number for t in pareto}
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    fig = Figure(figsize=(5.0 * min(3, len(pairs)), 4.2 * math.ceil(len(pairs) / 3)))
    axes = fig.subplots(math.ceil(len(pairs) / 3), min(3, len(pairs)), squeeze=False).ravel()
    for ax, (i, j) in zip(axes, pairs):
        rest = [t for t in complete if t.number not in front]
        ax.scatter([t.values[i] for t in rest], [t.values[j] for t in rest], s=14, color="0.6", label="trial")
        best = sorted(pareto, key=lambda t: t.values[i])
        ax.scatter([t.values[i] for t in best], [t.values[j] for t in best], s=28, color="C3", label="Pareto-optimal",
                   zorder=3)
        if len(names) == 2:
            ax.plot([t.values[i] for t in best], [t.values[j] for t in best], color="C3", lw=1)
        for t in (t for t in complete if is_baseline(t)):
            ax.annotate(kind_label(trial_kind(t)), (t.values[i], t.values[j]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.legend(fontsize=7)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    _save(fig, path)


# ------------------------------------------------------------------------------------------- summary
def _dashboard_section(run_dir: Path | None) -> list[str]:
    lines = ["## Open in optuna-dashboard", "", "```bash"]
    if run_dir is not None:
        lines.append(f"pip install optuna-dashboard && {locate_storage(run_dir).dashboard_command()}")
    else:
        lines += [
            "pip install optuna-dashboard && optuna-dashboard sqlite:///RUN_DIR/study.db   # SQLite run dir",
            "pip install optuna-dashboard && optuna-dashboard RUN_DIR/study.log            # journal-file run dir",
        ]
    return lines + ["```", ""]


def _recipe_yaml(trial: FrozenTrial) -> str:
    recipe = records.trial_recipe(trial)
    return recipe.to_yaml() if recipe is not None else "# no recipe stored with this trial\n"


def write_report(study: optuna.Study, out_dir: Path, *, title: str | None = None, run_dir: Path | None = None) -> Path:
    """Write ``summary.md``, ``trials.csv`` and the plots (see the module docstring; a sweep's:
    :mod:`evomerge.report_sweep`) as the dir ``out_dir``, and return the path of its ``summary.md``.

    ``run_dir`` (optional): the run dir the study was loaded from, to print its exact optuna-dashboard command.
    Plots that do not apply (no completed trial, one objective, too few search trials) are skipped with a note in
    the summary. The report is built in a temporary dir beside ``out_dir`` and then replaces it whole
    (:mod:`evomerge.outdir`): a full disk or a kill leaves the previous report (or none), never a half-written one
    or a stale plot of an earlier state; temporary dirs of killed reports are cleaned first.
    """
    out = Path(out_dir).expanduser()
    refuse_symlink(out)
    with building(out, force=True, shared=False) as tmp:
        if records.study_kind(study.user_attrs) == records.SWEEP_KIND:
            from evomerge.report_sweep import write_sweep_report

            write_sweep_report(study, tmp, title=title)
        else:
            _write_study_report(study, tmp, title=title, run_dir=run_dir)
    return out / "summary.md"


def _write_study_report(study: optuna.Study, out_dir: Path, *, title: str | None, run_dir: Path | None) -> None:
    trials = study.get_trials(deepcopy=False)
    info = records.study_info(study)
    counts = {STATE_WORDS.get(s, s.name.lower()): sum(t.state == s for t in trials) for s in TrialState
              if any(t.state == s for t in trials)}
    best = best_trials(study, trials)
    lines = [f"# {title or f'evomerge study {study.study_name}'}", ""]
    lines.append(f"- Study: `{study.study_name}` (kind {records.study_kind(study.user_attrs)}, "
                 f"space {info[records.SPACE] or MISSING})")
    if info[records.SOURCES]:
        lines.append(f"- Base: `{info[records.BASE]}`; sources: "
                     + ", ".join(f"`{s}`" for s in info[records.SOURCES]))
    objective = info[records.OBJECTIVE]
    directions = ", ".join(d.name.lower() for d in study.directions)
    lines.append(f"- Objective: {', '.join(objective) if isinstance(objective, list) else objective or MISSING}"
                 f" ({directions})" + ("; with the space's L1 penalty on the weights folded in (`score ∓ α Σ|w|`: "
                                       f"the `{SCORE_HEADER}` column is without it; test scores are unpenalized)"
                                       if has_penalty(trials) else ""))
    lines.append(f"- Trials: {len(trials)} (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    if wall := wall_seconds(trials):
        lines.append(f"- Wall time: {format_seconds(wall)} (first trial start to last trial end; the test scoring, "
                     "export and report come after)")
    if not best:
        lines.append("- Best trial: none yet (no completed trial)")
    elif len(study.directions) == 1:
        lines.append(f"- Best trial: #{best[0].number} ({kind_label(trial_kind(best[0]))}), "
                     f"objective {_cell(best[0].values[0])}")
        if confirmed := records.confirmed(study.user_attrs):
            lines.append(f"- Chosen among the {len(confirmed)} best, re-scored on the confirmation evaluator "
                         "(`confirm_top`): " + ", ".join(f"#{n} {_cell(v)}" for n, v in sorted(confirmed.items())))
    else:
        lines.append(f"- Best trial: #{best[0].number} (highest {objective_names(study)[0]})")
        lines.append("- Pareto-optimal trials: " + ", ".join(f"#{t.number}" for t in best))
    lines.append("")

    write_trials_csv(study, trials, out_dir / "trials.csv")
    header, rows, source = comparison_table(study, trials, best)
    about = ["Validation (`val`) and test split (`test`, `± stderr` where the evaluator computed it) scores: the "
             "objective and one metric per task; every metric and timing is in [trials.csv](trials.csv)."]
    if source is not None:
        name = kind_label(trial_kind(source).removeprefix(records.REFERENCE_PREFIX))
        first = " first" if len(study.directions) > 1 else ""
        about.append(f"`Δ`:{first} objective minus that of the best source alone ({name}"
                     f"{', lower is better' if records.direction_sign(study) < 0 else ''}).")
    lines += ["## Best vs baselines", "", " ".join(about), "",
              markdown_table(header, rows) if rows else "No completed trial yet.", ""]
    if best:
        lines += [f"## Best recipe (trial #{best[0].number})", "", "```yaml", _recipe_yaml(best[0]).rstrip(), "```", ""]

    importances = compute_importances(study, trials)
    lines += importance_section(importances)
    notes = _write_plots(study, trials, best, importances, out_dir)
    lines += ["## Plots", ""]
    lines += [f"![{name}]({name})\n" for name, note in notes.items() if not note]
    lines += [f"- `{name}`: {note}" for name, note in notes.items() if note]
    lines += ["", "All trials: [trials.csv](trials.csv)", ""]

    failed = [t for t in trials if t.state == TrialState.FAIL]
    broken = {label: ref[records.ERROR] for label, ref in records.references(study.user_attrs).items()
              if records.ERROR in ref}
    if failed or broken:
        lines += ["## Failed trials", ""]
        for t in failed:
            error = (str(records.trial_error(t) or "").strip() or "no error stored").splitlines()[0]
            lines.append(f"- #{t.number} ({kind_label(trial_kind(t))}): {error}")
        lines += [f"- reference {label} (outside the space): {error}" for label, error in broken.items()]
        lines.append("")
    lines += _dashboard_section(run_dir)
    (out_dir / "summary.md").write_text("\n".join(lines))


def _write_plots(
    study: optuna.Study, trials: Sequence[FrozenTrial], best: Sequence[FrozenTrial], importances: Importances,
    out_dir: Path,
) -> dict[str, str | None]:
    """Draw every plot that applies; {file name: None if drawn, else why not}."""
    notes: dict[str, str | None] = {}
    if best:
        plot_history(study, trials, out_dir / "history.png")
        notes["history.png"] = None
    else:
        notes["history.png"] = "skipped: no completed trial"
    if importances.values:
        plot_importances(importances.values, out_dir / "importances.png")
    notes["importances.png"] = importances.skipped
    num_layers = records.study_info(study)[records.NUM_LAYERS]
    best_recipe = records.trial_recipe(best[0]) if best else None
    if best_recipe is None:
        notes["layers.png"] = "skipped: no completed trial with a recipe"
    elif not num_layers:
        notes["layers.png"] = "skipped: the study has no 'num_layers' user_attr"
    else:
        notes["layers.png"] = plot_layers(best_recipe, int(num_layers), out_dir / "layers.png")
    if len(study.directions) > 1:
        if best:
            plot_pareto(study, trials, best, out_dir / "pareto.png")
        notes["pareto.png"] = None if best else "skipped: no completed trial"
    return notes
