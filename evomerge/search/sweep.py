"""``evomerge sweep``: merge methods x hyperparameter grids, every point a trial of one Optuna study.

A sweep config is a run config (:class:`~evomerge.search.config.RunConfig`: sources, base, evaluators, storage,
seed) plus ``sweep``, a mapping from method name to its grid::

    sweep:
      task_arithmetic: {lambda: [0.5, 1.0]}
      ties: {density: [0.1, 0.3, 0.5], lambda: [0.5, 1.0]}   # 3 x 2 = 6 points
      dare_ties: {density: [0.3, 0.7], seeds: 3}               # 2 points x 3 seeds = 6 trials
      model_stock: {}                                          # one point: the method's defaults

Each parameter maps to a list of values (the grid is their Cartesian product, in the order written) or to one value
(fixed for every point of the method). Every value is a scalar written into the recipe's ``parameters``: a global
parameter (``lambda``, ``t``) takes it as it is, a per-source one (``density``, ``weight``) applies it to every
source. Parameters a method's grid does not name keep the registry's default (per-source weights: 1 for every
source, i.e. uniform). ``seeds`` (stochastic methods only: ``method.stochastic`` in the registry, DARE and DELLA;
default 3) runs every point with the recipe seeds ``seed, seed + 1, ...``.

The study's trials are the grid's points x seeds, numbered in the order above (methods as written, the last
parameter varying fastest, seeds innermost) and walked by :class:`optuna.samplers.GridSampler` over one categorical
parameter, ``point`` (that number). A sweep therefore resumes and runs on many workers like a search: an
interrupted trial is failed and re-queued with the same point (:mod:`evomerge.search.storage`), a point that failed
on its own (its ``error`` says why) is done and is not run again. Near the end of a sweep with several workers,
GridSampler may score a point a second time (Optuna's documented behaviour); the first completed trial counts.

Points are scored on the validation split (the trial's objective) and ranked by their mean validation objective
over seeds; at the end the test split scores every completed trial for the report only (:func:`summarize` says
which point validation picks, per method and overall).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import Field

from evomerge.evaluate import build_evaluator
from evomerge.methods import METHODS, MergeMethod, MethodError, get_method, validate_params
from evomerge.recipe import Recipe, SourceSpec
from evomerge.recipe.mergekit import to_mergekit_yaml
from evomerge.recipe.schema import closest
from evomerge.search import trials as records
from evomerge.search.config import ConfigError, RunConfig
from evomerge.search.storage import INTERRUPTED
from evomerge.search.study import Runner, finish

POINT = "point"  # the trial parameter: the trial's index in expand(config)
SEEDS = "seeds"  # the grid key of the number of seeds
DEFAULT_SEEDS = 3  # of a stochastic method whose grid does not say
Scalar = float | int | bool

# search/soup settings that mean nothing in a sweep (its trials are the grid's points)
_NOT_IN_SWEEP = ("space", "template", "sampler", "pruner", "fidelities", "n_trials", "multi_objective", "accept",
                 "baselines")


class SweepError(ValueError):
    """A sweep config that cannot run; one line naming the key and the fix."""


class SweepConfig(RunConfig):
    """A run config whose trials are a grid of methods x hyperparameters (module docstring)."""

    sweep: dict[str, dict[str, Any]] = Field(description="method -> {parameter: value or [values], seeds: n}")
    max_points: int = Field(500, ge=1, description="refuse grids of more trials (points x seeds) than this")


@dataclass(frozen=True)
class Point:
    """One grid point: a method and the values the sweep gives its parameters (in the grid's order)."""

    method: str
    values: tuple[tuple[str, Scalar], ...]

    @property
    def params(self) -> dict[str, Scalar]:
        return dict(self.values)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values) or "defaults"


@dataclass(frozen=True)
class SweepTrial:
    """One trial of the sweep: a point and the seed offset (0 .. seeds - 1) of its recipe."""

    point: Point
    seed: int


def _axes(method: MergeMethod, grid: Mapping[str, Any]) -> tuple[list[tuple[str, list[Scalar]]], int]:
    """The grid's parameter axes ``[(name, values)]`` and its number of seeds; SweepError on bad input."""
    where = f"sweep.{method.name}"
    if not isinstance(grid, Mapping):
        raise SweepError(f"{where}: a grid is a mapping {{parameter: [values]}}, got {grid!r}")
    valid = [p.name for p in method.params]
    axes = []
    for name, value in grid.items():
        if name == SEEDS:
            continue
        if name not in valid:
            raise SweepError(f"{where}: unknown parameter {name!r}{closest(str(name), valid)}; valid: "
                             f"{', '.join(valid)}, {SEEDS}")
        values = list(value) if isinstance(value, list) else [value]
        if not values:
            raise SweepError(f"{where}.{name}: an empty list of values; give at least one")
        axes.append((str(name), values))
    seeds = grid.get(SEEDS, DEFAULT_SEEDS if method.stochastic else 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise SweepError(f"{where}.{SEEDS}: must be a whole number >= 1, got {seeds!r}")
    if SEEDS in grid and not method.stochastic and seeds != 1:
        stochastic = ", ".join(m.name for m in METHODS.values() if m.stochastic)
        raise SweepError(f"{where}.{SEEDS}: {method.name} draws no random numbers (one seed gives every result); "
                         f"seeds apply to {stochastic}")
    return axes, seeds


def expand(config: SweepConfig) -> list[SweepTrial]:
    """Every trial of the sweep, in the order of the study's ``point`` index (module docstring); SweepError (one
    line) for an unknown method or parameter, a value the registry refuses, an empty grid, seeds < 1, or more
    trials than ``max_points``. Checks the config only: nothing is loaded."""
    if not config.sweep:
        raise SweepError("sweep: an empty grid; name at least one method, e.g. sweep: {ties: {density: [0.3, 0.5]}}")
    grids = {}
    for name, grid in config.sweep.items():
        if name not in METHODS:
            raise SweepError(f"sweep: unknown merge method {name!r}{closest(name, list(METHODS))}; valid: "
                             f"{', '.join(sorted(METHODS))}")
        grids[name] = _axes(get_method(name), grid)
    size = sum(math.prod(len(values) for _, values in axes) * seeds for axes, seeds in grids.values())
    if size > config.max_points:  # counted before expanding: a huge grid is refused at once
        raise SweepError(f"sweep: {size} trials (points x seeds) exceed max_points = {config.max_points}; shrink "
                         "the grid or raise max_points")
    out: list[SweepTrial] = []
    for name, (axes, seeds) in grids.items():
        for combination in itertools.product(*(values for _, values in axes)):
            point = Point(name, tuple(zip((n for n, _ in axes), combination)))
            try:
                validate_params(get_method(name), point.params, len(config.sources), config.base is not None)
            except MethodError as exc:
                raise SweepError(f"sweep.{name} ({point.label}): {exc}") from None
            out += [SweepTrial(point, k) for k in range(seeds)]
    return out


def recipe_for(config: SweepConfig, trial: SweepTrial) -> Recipe:
    """The recipe of a sweep trial: the point's values as the recipe's parameters (module docstring)."""
    return Recipe(method=trial.point.method, base=config.base, sources=[SourceSpec(model=s) for s in config.sources],
                  parameters=trial.point.params, seed=config.seed + trial.seed, dtype=config.dtype)


class SweepRunner(Runner):
    """The search's runner (models, evaluators, study, resume) whose trials are the sweep's grid."""

    def __init__(self, config: SweepConfig, *, progress: bool = True) -> None:
        self.grid = expand(config)  # bad input fails here, before Runner loads any model
        super().__init__(config, study_kind=records.SWEEP_KIND, progress=progress)
        self.config: SweepConfig = config

    def planned_methods(self) -> list[str]:
        """The grid's methods: what the engine plans memory for (a sweep scores nothing else)."""
        return list(self.config.sweep)

    def open_study(self) -> optuna.Study:
        """The study; SweepError when it was created by a sweep of other trials (a changed grid, seed or sources):
        its points' numbers would mean other recipes."""
        study = super().open_study()
        stored = SweepConfig.model_validate(records.study_info(study)[records.CONFIG])
        if [recipe_for(stored, t) for t in expand(stored)] != [recipe_for(self.config, t) for t in self.grid]:
            raise SweepError(f"study {study.study_name!r} holds a sweep of other points (grid, seed or sources "
                             "changed); keep its config to resume it, or give the new sweep another name or out dir")
        return study

    def sampler(self, n_objectives: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.GridSampler({POINT: list(range(len(self.grid)))}, seed=self.config.seed)

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        sweep_trial = self.grid[trial.suggest_categorical(POINT, list(range(len(self.grid))))]
        return self.record(trial, recipe_for(self.config, sweep_trial), records.sweep_kind(sweep_trial.point.method))

    def optimize(self, study: optuna.Study, *, n_trials: int | None = None, progress: bool = True) -> None:
        """Run trials until every point is done (``n_trials``: until that many are)."""
        super().optimize(study, n_trials=n_trials or len(self.grid), progress=progress)

    def finished(self, study: optuna.Study) -> int:
        """Points done: completed, or failed on their own (an interrupted trial is re-queued: it is not done)."""
        return len(done_points(study.get_trials(deepcopy=False)))

    def finalize(self, study: optuna.Study, *, export: bool = True) -> dict[str, Any]:
        """Score every completed point on the test split (once: a re-run keeps the stored scores), write the
        overall pick's recipe (evomerge + mergekit YAML) and ``summary.json``. ``export`` is not used: a sweep
        compares points (``evomerge merge best_recipe.yaml`` builds the picked one)."""
        test = build_evaluator(self.config.test_spec())
        todo = [trial for trial in first_completed(study.get_trials(deepcopy=False)).values()
                if f"{records.TEST_PREFIX}{trial.number}" not in study.user_attrs]
        with self.progress.phase("test scoring", len(todo), unit="recipe") as bar:
            for trial in todo:
                result = self.test_score(test, records.recipe_of(trial), f"trial #{trial.number}")
                if isinstance(result, Exception):
                    records.set_test_error(study, trial.number, result)
                else:
                    records.set_test_result(study, trial.number, result.metrics, result.objective, result.stderr)
                bar.update(1)
        summary = summarize(study)
        if summary.overall is None:
            raise records.StudyFailed(f"study {study.study_name} has no completed trial")
        recipe = records.recipe_of(study.get_trials(deepcopy=False)[summary.overall.trials[0]])  # number = index
        recipe.to_yaml(self.run_dir / "best_recipe.yaml")
        (self.run_dir / "best_recipe.mergekit.yaml").write_text(to_mergekit_yaml(recipe))
        result = {"best_point": summary.overall.point.method + ": " + summary.overall.point.label,
                  "best_value": summary.overall.val.mean, "best_test": summary.overall.test.mean,
                  "picks": {m: {"point": r.point.label, "val": r.val.mean, "test": r.test.mean}
                            for m, r in summary.picks.items()}}
        (self.run_dir / "summary.json").write_text(json.dumps(result, indent=2))
        return result


def run_sweep(config: SweepConfig, *, progress: bool = True) -> dict[str, Any]:
    """``evomerge sweep``: open/resume the study, score every remaining point, test-score them, write the report."""
    with SweepRunner(config, progress=progress) as runner:
        study = runner.open_study()
        runner.optimize(study)
        return finish(runner, study, export=False)


# --------------------------------------------------------------------------------------------- results
def _point_index(trial: FrozenTrial) -> int | None:
    value = trial.params.get(POINT)
    return int(value) if value is not None else None


def done_points(trials: Sequence[FrozenTrial]) -> set[int]:
    """The indices of the points that are done: a completed trial, or a failure that was no interruption."""
    return {i for t in trials if (i := _point_index(t)) is not None and (
        t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and records.trial_error(t) not in
                                           (None, INTERRUPTED)))}


def first_completed(trials: Sequence[FrozenTrial]) -> dict[int, FrozenTrial]:
    """``{point index: its first completed trial}`` (a point scored twice by two workers counts once)."""
    out: dict[int, FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        i = _point_index(t)
        if i is not None and t.state == TrialState.COMPLETE:
            out.setdefault(i, t)
    return out


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the finite values among ``n`` seeds."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not finite:
            return cls(None, None, 0)
        return cls(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0, len(finite))


@dataclass(frozen=True)
class PointResult:
    """A point's scores over its seeds: objective and metrics on validation and test, and the trials behind them."""

    point: Point
    trials: list[int]  # trial numbers of the completed seeds, seed order
    val: Spread
    test: Spread
    val_metrics: dict[str, Spread]
    test_metrics: dict[str, Spread]
    errors: list[str] = field(default_factory=list)  # failed seeds (validation) and test-scoring errors


@dataclass(frozen=True)
class SweepSummary:
    """Every point's result, the point validation picks per method and overall, and the metric names."""

    points: list[PointResult]
    picks: dict[str, PointResult]
    overall: PointResult | None
    metrics: list[str]
    sign: float  # +1: higher objective is better


def summarize(study: optuna.Study) -> SweepSummary:
    """Aggregate a sweep study: per point the mean +- std over seeds of the validation objective (the trials'
    values), the test objective and each metric; the pick of each method and overall is the point with the best
    mean validation objective (first in grid order on a tie). The test split never enters the choice."""
    config = SweepConfig.model_validate(records.study_info(study)[records.CONFIG])
    grid = expand(config)
    trials = study.get_trials(deepcopy=False)
    completed = first_completed(trials)
    failed = {i: records.trial_error(t) for t in trials if (i := _point_index(t)) is not None
              and t.state == TrialState.FAIL and records.trial_error(t) not in (None, INTERRUPTED)}
    sign = records.direction_sign(study)
    attrs = study.user_attrs
    by_point: dict[Point, list[int]] = {}
    for index, sweep_trial in enumerate(grid):
        by_point.setdefault(sweep_trial.point, []).append(index)
    names = list(dict.fromkeys(n for t in completed.values() for n in records.trial_metrics(t)))
    results = []
    for point, indices in by_point.items():
        done = [completed[i] for i in indices if i in completed]
        tests = [records.scored_on_test(attrs, t) for t in done]
        val_metrics = [records.trial_metrics(t) for t in done]
        test_metrics = [m for _, m in tests]
        errors = [f"seed {grid[i].seed}: {failed[i]}" for i in indices if i in failed and i not in completed]
        errors += [f"test of trial #{t.number}: {e}" for t in done if (e := records.test_error(attrs, t))]
        results.append(PointResult(
            point, [t.number for t in done], Spread.of([t.values[0] for t in done]), Spread.of([o for o, _ in tests]),
            {n: Spread.of([m.get(n) for m in val_metrics]) for n in names},
            {n: Spread.of([m.get(n) for m in test_metrics]) for n in names}, errors))
    picks: dict[str, PointResult] = {}
    for result in results:
        current = picks.get(result.point.method)
        if result.val.mean is not None and (current is None or sign * result.val.mean > sign * current.val.mean):
            picks[result.point.method] = result
    overall = None
    for result in picks.values():
        if overall is None or sign * result.val.mean > sign * overall.val.mean:
            overall = result
    return SweepSummary(results, picks, overall, names, sign)


def load_sweep_config(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read a sweep config (paths relative to the file, as :meth:`RunConfig.from_yaml`) and check it: SweepError
    for search/soup settings a sweep does not use and for a bad grid (:func:`expand`)."""
    try:
        config = SweepConfig.from_yaml(path, **overrides)
    except ConfigError as err:
        raise SweepError(str(err)) from None
    given = [key for key in _NOT_IN_SWEEP if key in config.model_fields_set]
    if given:
        raise SweepError(f"{path}: {', '.join(given)}: not used by a sweep (its trials are the grid's points); "
                         "remove it")
    expand(config)
    return config
