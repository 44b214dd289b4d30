"""The schema of what an evomerge study stores: every trial and study attribute key, and typed accessors.

Optuna keeps free-form ``user_attrs`` on each trial and on the study. evomerge's records live there, under the keys
below; this module is their only home, read by the search (:mod:`evomerge.search.study`), the soup and the report.
The keys are the on-disk format of every study ever written: renaming one loses data silently, so
``tests/test_trials.py`` writes a study with the keys spelled out literally and checks that it resumes and reports.

Trial user_attrs:

- ``recipe``: the recipe the trial scored (``model_dump`` of either kind, JSON mode; read back by
  :func:`evomerge.recipe.parse_recipe`);
- ``kind``: ``"search"``, ``"baseline:<label>"``, ``"soup:<n>"`` or ``"sweep:<method>"`` (missing: a search trial);
- ``metrics``: the validation metrics ``{name: value}``; each numeric one also as its own attr ``val/<name>`` (e.g.
  ``val/zoo_add/acc``), so that ``study.trials_dataframe()`` and optuna-dashboard sort and plot it;
- ``score`` / ``penalty``: with a space's L1 penalty (:mod:`evomerge.search.space`), the evaluator's unpenalized
  objective and the penalty ``α Σ|w|`` the trial's value includes (``value = score ∓ penalty``);
- ``merge_seconds`` / ``eval_seconds``: timings;
- ``error``: ``"<ExceptionType>: <message>"`` of a failed trial;
- ``retry_of``: the number of the interrupted trial this one re-runs with the same parameters;
- ``test_metrics`` / ``test_objective``: test-split scores stored on the trial itself (older studies; finished
  trials are read-only, so evomerge writes them to the study's ``test:<number>``).

Study user_attrs: ``config`` (the run config), ``num_layers``, ``sources``, ``base``, ``kind`` (``search`` |
``soup`` | ``sweep``), ``space`` (the space file's name), ``objective`` (metric names), ``param_naming`` (the trial
parameter naming version, :data:`evomerge.search.space.NAMING`; missing: version 1, the index names),
``baselines_enqueued``,
``greedy`` (a soup's result ``{trial, kept, of}``), ``test:<number>`` (``{metrics, objective}`` or ``{error}``) and
``reference:<label>`` (a baseline outside the space: ``{recipe, metrics, values, merge_seconds, eval_seconds,
test_metrics, test_objective}``, or ``test_error``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.recipe import AnyRecipe, parse_recipe

# trial user_attrs
RECIPE = "recipe"
KIND = "kind"
METRICS = "metrics"
VAL_PREFIX = "val/"
SCORE = "score"
PENALTY = "penalty"
MERGE_SECONDS = "merge_seconds"
EVAL_SECONDS = "eval_seconds"
ERROR = "error"
RETRY_OF = "retry_of"
TEST_METRICS = "test_metrics"
TEST_OBJECTIVE = "test_objective"
TEST_STDERR = "test_stderr"
STDERR = "stderr"
CONFIRM_PREFIX = "confirm:"  # study attr confirm:<number>: the trial re-scored by the confirmation evaluator
OPTUNA_FAILED_TRIAL = "failed_trial"  # a system attr: the trial Optuna's retry callback re-ran (older studies)
# study user_attrs
CONFIG = "config"
NUM_LAYERS = "num_layers"
SOURCES = "sources"
BASE = "base"
SPACE = "space"
OBJECTIVE = "objective"
PARAM_NAMING = "param_naming"
BASELINES_ENQUEUED = "baselines_enqueued"
GREEDY = "greedy"
TEST_PREFIX = "test:"
REFERENCE_PREFIX = "reference:"
# inside a test:<number> / reference:<label> record
VALUES = "values"
TEST_ERROR = "test_error"

SEARCH_KIND = "search"
SOUP_KIND = "soup"
SWEEP_KIND = "sweep"
PARAMETER_KINDS = (SEARCH_KIND, SWEEP_KIND)  # studies whose trials are parameter sets: an interrupted one is re-queued
BASELINE_PREFIX = "baseline:"


class StudyFailed(RuntimeError):
    """A run ended without a result (no trial completed); its report lists the failures."""


class AttrTrial(Protocol):
    """What the accessors need of a trial: :class:`optuna.Trial` (live) and :class:`FrozenTrial` both have it."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...

    def set_user_attr(self, key: str, value: Any) -> None: ...


# ------------------------------------------------------------------------------------------------ trials
def trial_kind(trial: FrozenTrial | AttrTrial) -> str:
    """``"search"``, ``"baseline:<label>"`` or ``"soup:<step>"`` (user_attr ``kind``; none: a search trial)."""
    return str(trial.user_attrs.get(KIND, SEARCH_KIND))


def is_baseline(trial: FrozenTrial) -> bool:
    return trial_kind(trial).startswith(BASELINE_PREFIX)


def baseline_kind(label: str) -> str:
    return f"{BASELINE_PREFIX}{label}"


def soup_kind(n_members: int) -> str:
    return f"{SOUP_KIND}:{n_members}"


def sweep_kind(method: str) -> str:
    return f"{SWEEP_KIND}:{method}"


def trial_recipe(trial: FrozenTrial) -> AnyRecipe | None:
    """The recipe a trial scored, None if it stored none (it failed before its recipe was built)."""
    data = trial.user_attrs.get(RECIPE)
    return parse_recipe(data) if data else None


def recipe_of(trial: FrozenTrial) -> AnyRecipe:
    """The recipe of a trial that scored one (a completed trial stores it before scoring)."""
    recipe = trial_recipe(trial)
    if recipe is None:
        raise ValueError(f"trial #{trial.number} stored no recipe (user_attr {RECIPE!r}); it cannot be re-merged")
    return recipe


def trial_metrics(trial: FrozenTrial) -> dict[str, Any]:
    return dict(trial.user_attrs.get(METRICS) or {})


def trial_seconds(trial: FrozenTrial) -> tuple[float | None, float | None]:
    """(merge seconds, eval seconds) of a trial, None where not stored."""
    return trial.user_attrs.get(MERGE_SECONDS), trial.user_attrs.get(EVAL_SECONDS)


def trial_error(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(ERROR)


def set_started(trial: AttrTrial, recipe: AnyRecipe, kind: str) -> None:
    """What a trial is about to score (written before scoring: a failed trial keeps its recipe)."""
    trial.set_user_attr(RECIPE, recipe.model_dump(mode="json"))
    trial.set_user_attr(KIND, kind)


def set_metrics(trial: AttrTrial, metrics: Mapping[str, Any]) -> None:
    trial.set_user_attr(METRICS, dict(metrics))
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            trial.set_user_attr(f"{VAL_PREFIX}{name}", value)


def set_scored(trial: AttrTrial, metrics: Mapping[str, Any], merge_seconds: float, eval_seconds: float) -> None:
    set_metrics(trial, metrics)
    trial.set_user_attr(MERGE_SECONDS, merge_seconds)
    trial.set_user_attr(EVAL_SECONDS, eval_seconds)


def set_penalty(trial: AttrTrial, score: float, penalty: float) -> None:
    """A penalized trial's unpenalized objective (``score``) and the penalty its value includes."""
    trial.set_user_attr(SCORE, score)
    trial.set_user_attr(PENALTY, penalty)


def trial_score(trial: FrozenTrial) -> float | None:
    """The unpenalized objective of a penalized trial, None for a trial without a penalty."""
    return trial.user_attrs.get(SCORE)


def trial_penalty(trial: FrozenTrial) -> float | None:
    """The penalty a trial's value includes (``α Σ|w|``), None for a trial without one."""
    return trial.user_attrs.get(PENALTY)


def set_error(trial: AttrTrial, exc: BaseException | str) -> None:
    trial.set_user_attr(ERROR, exc if isinstance(exc, str) else describe(exc))


def describe(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, the one line a failure is stored and printed as."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The user_attrs an interrupted ``trial``'s re-run starts with: its kind, and which trial it re-runs."""
    return {KIND: trial_kind(trial), RETRY_OF: trial.number}


def retried(trials: Sequence[FrozenTrial]) -> set[int]:
    """The numbers of the trials that were queued again: named by a later trial's ``retry_of``, or by the system
    attr ``failed_trial`` of Optuna's ``RetryHeartbeatStaleTrialCallback``, which evomerge used before ``retry_of``."""
    return {n for t in trials for n in (t.user_attrs.get(RETRY_OF), t.system_attrs.get(OPTUNA_FAILED_TRIAL))
            if isinstance(n, int)}


# ------------------------------------------------------------------------------------------------- study
def study_info(study: optuna.Study) -> dict[str, Any]:
    """The run's description stored on the study: {config, num_layers, sources, base, kind, space, objective}."""
    attrs = study.user_attrs
    return {key: attrs.get(key) for key in (CONFIG, NUM_LAYERS, SOURCES, BASE, KIND, SPACE, OBJECTIVE)}


def set_study_info(study: optuna.Study, *, config: dict[str, Any], num_layers: int, sources: Sequence[str],
                   base: str | None, kind: str, space: str | None, objective: Sequence[str],
                   param_naming: int) -> None:
    """Describe the run on a new study (once: a resumed study keeps the description it was created with, and so
    the parameter naming of its trials)."""
    if CONFIG in study.user_attrs:
        return
    for key, value in {CONFIG: config, NUM_LAYERS: num_layers, SOURCES: list(sources), BASE: base, KIND: kind,
                       SPACE: space, OBJECTIVE: list(objective), PARAM_NAMING: param_naming}.items():
        study.set_user_attr(key, value)


def set_metric_names(study: optuna.Study, names: Sequence[str]) -> None:
    """Name the objective value(s) in Optuna itself (``study.metric_names``: ``trials_dataframe()``'s ``value_<name>``
    column, optuna-dashboard's axis labels). Optuna calls the API experimental; its warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(names))


def param_naming(study: optuna.Study) -> int:
    """The trial parameter naming version of the study (1 for studies written before the key existed)."""
    return int(study.user_attrs.get(PARAM_NAMING, 1))


def study_kind(study_attrs: Mapping[str, Any]) -> str:
    return str(study_attrs.get(KIND, SEARCH_KIND))


def objective_metric_names(study: optuna.Study) -> list[str] | None:
    names = study.user_attrs.get(OBJECTIVE)
    return names if isinstance(names, list) else None


def baselines_enqueued(study: optuna.Study) -> bool:
    return bool(study.user_attrs.get(BASELINES_ENQUEUED))


def mark_baselines_enqueued(study: optuna.Study) -> None:
    study.set_user_attr(BASELINES_ENQUEUED, True)


def greedy(study: optuna.Study) -> dict[str, Any] | None:
    """A soup's result ``{trial, kept, of}``, None for a search."""
    return study.user_attrs.get(GREEDY) or None


def set_greedy(study: optuna.Study, *, trial: int, kept: Sequence[str], of: int) -> None:
    study.set_user_attr(GREEDY, {"trial": trial, "kept": list(kept), "of": of})


def set_test_result(study: optuna.Study, number: int, metrics: Mapping[str, Any], objective: float,
                    stderr: Mapping[str, float] | None = None) -> None:
    """Test-split scores of trial ``number`` and their standard errors where the evaluator computed them (finished
    trials are read-only in Optuna: they live on the study)."""
    study.set_user_attr(f"{TEST_PREFIX}{number}", {METRICS: dict(metrics), OBJECTIVE: objective,
                                                   **({STDERR: dict(stderr)} if stderr else {})})


def set_confirm_result(study: optuna.Study, number: int, metrics: Mapping[str, Any], objective: float) -> None:
    """Trial ``number`` re-scored by the confirmation evaluator (``confirm_top``; on the study, like test scores)."""
    study.set_user_attr(f"{CONFIRM_PREFIX}{number}", {METRICS: dict(metrics), OBJECTIVE: objective})


def confirmed(study_attrs: Mapping[str, Any]) -> dict[int, float]:
    """trial number -> its confirmation objective, for every trial re-scored by ``confirm_top``."""
    return {int(key.removeprefix(CONFIRM_PREFIX)): float(value[OBJECTIVE]) for key, value in study_attrs.items()
            if key.startswith(CONFIRM_PREFIX) and OBJECTIVE in value}


def set_test_error(study: optuna.Study, number: int, exc: BaseException) -> None:
    """Trial ``number`` could not be scored on the test split: why (the report's row says it)."""
    study.set_user_attr(f"{TEST_PREFIX}{number}", {ERROR: describe(exc)})


def scored_on_test(study_attrs: Mapping[str, Any], trial: FrozenTrial) -> tuple[Any, dict[str, Any]]:
    """(test objective, test metrics) of a trial: its own user_attrs, else the study's ``test:<number>``."""
    stored = study_attrs.get(f"{TEST_PREFIX}{trial.number}") or {}
    objective = trial.user_attrs.get(TEST_OBJECTIVE, stored.get(OBJECTIVE))
    return objective, trial.user_attrs.get(TEST_METRICS, stored.get(METRICS)) or {}


def test_stderr(study_attrs: Mapping[str, Any], trial: FrozenTrial) -> dict[str, float]:
    """Standard errors of a trial's (or a reference's) test metrics, ``{}`` where none were computed."""
    stored = study_attrs.get(f"{TEST_PREFIX}{trial.number}") or {}
    return trial.user_attrs.get(TEST_STDERR, stored.get(STDERR)) or {}


def test_error(study_attrs: Mapping[str, Any], trial: FrozenTrial) -> str | None:
    """Why a trial (or a reference) has no test score, None if it has one or was not scored."""
    stored = study_attrs.get(f"{TEST_PREFIX}{trial.number}") or {}
    return trial.user_attrs.get(TEST_ERROR, stored.get(ERROR))


def references(study_attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The study's references ``{label: record}`` (user_attrs ``reference:<label>``), in the order stored."""
    return {key.removeprefix(REFERENCE_PREFIX): ref for key, ref in study_attrs.items()
            if key.startswith(REFERENCE_PREFIX) and isinstance(ref, dict)}


def reference_key(label: str) -> str:
    return f"{REFERENCE_PREFIX}{label}"


def set_reference(study: optuna.Study, label: str, *, recipe: AnyRecipe, metrics: Mapping[str, Any],
                  values: Sequence[float], merge_seconds: float, eval_seconds: float) -> None:
    study.set_user_attr(reference_key(label), {
        RECIPE: recipe.model_dump(mode="json"), METRICS: dict(metrics), VALUES: list(values),
        MERGE_SECONDS: merge_seconds, EVAL_SECONDS: eval_seconds})


def set_reference_error(study: optuna.Study, label: str, *, recipe: AnyRecipe, error: BaseException) -> None:
    """Reference ``label`` could not be scored on the validation split: why (it has no row in the table)."""
    study.set_user_attr(reference_key(label), {RECIPE: recipe.model_dump(mode="json"), ERROR: describe(error)})


def set_reference_test(study: optuna.Study, label: str, *, metrics: Mapping[str, Any] | None = None,
                       objective: float | None = None, stderr: Mapping[str, float] | None = None,
                       error: BaseException | None = None) -> None:
    """The test-split scores of reference ``label`` (or why it could not be scored) added to its record."""
    record = dict(references(study.user_attrs)[label])
    if error is not None:
        record[TEST_ERROR] = describe(error)
    else:
        record.update({TEST_METRICS: dict(metrics or {}), TEST_OBJECTIVE: objective,
                       **({TEST_STDERR: dict(stderr)} if stderr else {})})
    study.set_user_attr(reference_key(label), record)


def reference_as_trial(label: str, record: Mapping[str, Any]) -> FrozenTrial | None:
    """A reference as a detached trial (number -1) that the report's columns read like any trial; None if it has
    no values (it was not scored)."""
    if not record.get(VALUES):
        return None
    attrs = {k: v for k, v in record.items() if k != VALUES}
    return optuna.trial.create_trial(values=record[VALUES], user_attrs={**attrs, KIND: reference_key(label)})


# --------------------------------------------------------------------------------------------- results
def direction_sign(study: optuna.Study) -> float:
    """+1 when the study maximizes its (first) objective, -1 when it minimizes it (``sign * value``: higher is
    better)."""
    return 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0


def best_trials(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The result of the study, first the one a run exports; [] if no trial completed: a soup's greedy soup (study
    user_attr ``greedy``), else the best trial (one objective; among the re-scored ones by their confirmation score
    when ``confirm_top`` ran, ties to the earlier trial) or the Pareto-optimal trials, best first objective first."""
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return []
    soup = greedy(study)
    if soup:  # a soup: its result is the greedy soup, whatever ties the scores hold
        return [t for t in trials if t.number == soup["trial"]]
    sign = direction_sign(study)
    if len(study.directions) == 1:
        scores = confirmed(study.user_attrs)
        candidates = [t for t in trials if t.number in scores and t.state == TrialState.COMPLETE]
        if candidates:
            return [min(candidates, key=lambda t: (-sign * scores[t.number], t.number))]
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: -sign * t.values[0])


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (one per study created and per trial finished) off inside the block; its verbosity is
    restored after."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
