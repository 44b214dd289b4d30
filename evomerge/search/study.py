"""The search loop: an Optuna study proposes recipes, the engine materializes them in place, an evaluator scores them.

One process (``evomerge search``) or many (``evomerge worker``) share a study through an Optuna storage: a SQLite
file in the run dir by default, PostgreSQL for several machines. Every trial stores its recipe and metrics
(:mod:`evomerge.search.trials` is their schema). Trials that crash become FAIL with the reason and the search goes
on; trials left RUNNING by a killed process are failed and re-queued when the next run starts
(:mod:`evomerge.search.storage`: at once on a local study, after the heartbeat grace period on a shared one).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from evomerge.calibration import prepare
from evomerge.engine import MergeEngine
from evomerge.engine.memory import layer_stack_bytes
from evomerge.engine.stacking import build_stacked_model
from evomerge.evaluate import EvalResult, Evaluator, build_evaluator
from evomerge.merge import check_moe_memory, check_stack_memory, merge_to_dir, tokenizer_dir
from evomerge.modelcard import Provenance, SplitScores, mergekit_exportable, provenance
from evomerge.moe import MoeModel
from evomerge.moe.arch import open_moe_inputs
from evomerge.outdir import recover as recover_dir
from evomerge.progress import RunProgress
from evomerge.recipe import AnyRecipe, MoeRecipe, Recipe, StackRecipe, parse_recipe
from evomerge.recipe.mergekit import to_mergekit_yaml
from evomerge.search import trials as records
from evomerge.search.cmaes_restart import RestartCmaEsSampler
from evomerge.search.config import RunConfig
from evomerge.search.moe_space import NO_TEMPLATE
from evomerge.search.space import (
    NAMING,
    ModelSet,
    SearchSpace,
    SpaceError,
    StackingSpace,
    penalized,
)
from evomerge.search.storage import (
    StudyLock,
    check_storage,
    make_storage,
    mask_url,
    recover,
    sqlite_path,
    storage_full,
)
from evomerge.search.trials import best_trials, direction_sign, quiet_optuna, trial_kind

log = logging.getLogger(__name__)


def make_sampler(name: str, *, seed: int, continuous: bool, n_objectives: int) -> optuna.samplers.BaseSampler:
    """The sampler for ``name``; ``auto`` is NSGA-II for several objectives, CMA-ES for continuous spaces, TPE
    otherwise. CMA-ES runs with IPOP restarts (:class:`~evomerge.search.cmaes_restart.RestartCmaEsSampler`): a
    converged run restarts from a random mean with a doubled population."""
    if name == "auto":
        name = "nsga2" if n_objectives > 1 else "cmaes" if continuous else "tpe"
    if name == "cmaes":
        return RestartCmaEsSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; use auto, cmaes, tpe, gp, random or nsga2")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Successive halving / Hyperband over the evaluator's fidelity levels, or a Wilcoxon test on per-item scores."""
    return {
        "none": optuna.pruners.NopPruner,
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=2),
        "wilcoxon": lambda: optuna.pruners.WilcoxonPruner(p_threshold=0.1),
    }[name]()




Callback = Callable[[optuna.Study, FrozenTrial], None]


def load_callback(spec: str) -> Callback:
    """The Optuna callback of a config's ``callbacks`` entry ``"module:factory"``: ``factory()``, called once per run
    (e.g. a tracker's constructor with its settings). A bad entry is a ValueError naming it, before any trial runs."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"callbacks entry {spec!r}: write 'module:factory' (a function returning a callback)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"callbacks entry {spec!r}: {exc}; is the module installed or on PYTHONPATH?") from None
    callback = factory()
    if not callable(callback):
        raise ValueError(f"callbacks entry {spec!r}: {attr}() returned {type(callback).__name__} {callback!r:.60}, "
                         "not a callback (study, trial) -> None")
    return callback


def objective_labels(metrics: Sequence[str], weights: Sequence[float] | None, n_objectives: int) -> list[str]:
    """The names of a study's objective values: the metrics themselves (several objectives, or one metric), else the
    mean that makes up the one objective, ``mean(a, b)`` or ``weighted mean(0.75 a, 0.25 b)``."""
    if n_objectives > 1 or len(metrics) == 1:
        return list(metrics)
    if weights is None:
        return [f"mean({', '.join(metrics)})"]
    return [f"weighted mean({', '.join(f'{w:g} {m}' for w, m in zip(weights, metrics))})"]


class TrialFault(RuntimeError):
    """A trial whose evaluation cannot count: a non-finite score, ``sys.exit`` in the evaluator, a timeout."""


@dataclass
class Scored:
    """A recipe and its validation result."""

    recipe: AnyRecipe
    result: EvalResult
    merge_seconds: float


def evaluate(evaluator: Evaluator, model: nn.Module, tokenizer: Any, *, fidelity: float = 1.0,
             deadline: float | None = None) -> EvalResult:
    """``evaluator.score`` as a trial may count it: a non-finite objective, ``sys.exit`` in the user's code, or a
    call still running at ``deadline`` (``time.monotonic()``; the run config's ``trial_timeout_s``) raise
    :class:`TrialFault`, so the trial fails with the reason instead of ending the run or hanging it."""
    try:
        with _alarm(deadline):
            result = evaluator.score(model, tokenizer, fidelity=fidelity)
    except SystemExit as exc:  # a user evaluator calling sys.exit must not end the search (nor leave it RUNNING)
        raise TrialFault(f"the evaluator called sys.exit({exc.code!r})") from None
    bad = [v for v in (result.objective, *result.objectives) if not math.isfinite(v)]
    if bad:
        raise TrialFault(f"the evaluator scored a non-finite objective ({bad[0]}); metrics {result.metrics}")
    return result


class _Timeout(BaseException):
    """Raised by the alarm inside the evaluator: a BaseException, so the user's ``except Exception`` cannot swallow
    it; :func:`_alarm` turns it into a :class:`TrialFault` at its own boundary."""


@contextlib.contextmanager
def _alarm(deadline: float | None) -> Iterator[None]:
    """Interrupt the block at ``deadline`` (SIGALRM; only the main thread can receive it: elsewhere, no limit).
    Only evaluator calls are timed this way: interrupting a merge half-way would leave the live model half-written."""
    if deadline is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TrialFault("trial_timeout_s reached before the evaluation started")

    def expire(signum: int, frame: object) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    except _Timeout:
        raise TrialFault("the trial ran longer than trial_timeout_s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_AnyRecipeT = TypeVar("_AnyRecipeT", Recipe, StackRecipe, MoeRecipe)

class Runner:
    """Owns the live model (through the engine), the evaluators and the study of one run.

    Everything that can be checked — config, space, sources, evaluator tasks — is checked in the constructor,
    before any trial runs, so bad input never leaves a half-made study behind.
    """

    def __init__(self, config: RunConfig, *, study_kind: str = records.SEARCH_KIND, progress: bool = True) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.kind = study_kind
        self.progress = RunProgress(config.name, enabled=progress)  # the run's one display (evomerge.progress)
        check_storage(config.storage_url)  # before anything is created or loaded
        db = sqlite_path(config.storage_url)
        self.lock = StudyLock(db) if db is not None else None
        if self.lock is not None:  # a second process on a local study is refused before any model loads
            self.lock.check()
        self.space = SearchSpace.from_yaml(config.space) if config.space else None
        if study_kind == records.SEARCH_KIND and self.space is None:
            raise ValueError("a search needs 'space': a search space YAML (see search_spaces/)")
        if self.space is not None and self.space.penalty is not None and config.multi_objective:
            raise ValueError(f"{self.space.name}: penalty folds an L1 term on the weights into one objective, and a "
                             "multi_objective run has several: drop the space's penalty or multi_objective")
        self.callbacks = [load_callback(spec) for spec in config.callbacks]  # before any model loads
        self.evaluator = build_evaluator(config.evaluator)
        template = self._template()
        # the live model: an MoE search's MoeModel (built once, re-materialized per trial), else the merge engine's
        self.engine: MergeEngine | None = None
        self.moe: MoeModel | None = None
        if template is not None:
            self.models = ModelSet(base=template.base, sources=[e.model for e in template.experts],
                                   num_layers=open_moe_inputs(template).num_layers, template=template)
            if self.space is not None:
                self.space.check(self.models)  # from config files and headers, before any weight loads
            check_moe_memory(template, device=config.device)  # the live MoE and its export, before it is built
            with self.progress.phase("load models"):
                self.moe = MoeModel(template, device=config.device, materialize=False)
        else:
            if self.space is not None and self.space.is_moe:
                raise SpaceError(f"{self.space.name}: {NO_TEMPLATE}")
            with self.progress.phase("load models"):
                self.engine = MergeEngine(config.models, device=config.device, dtype=config.dtype,
                                          methods=self.planned_methods())
            self.models = ModelSet(base=config.base, sources=list(config.sources), num_layers=self.engine.num_layers)
            if self.space is not None and isinstance(self.space.spec, StackingSpace):
                self._check_stack_memory(self.space.spec.slots(self.models))
        self.tokenizer_dir = tokenizer_dir(Recipe(method="linear", base=self.models.base,
                                                  sources=[{"model": m} for m in self.models.sources]))
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir) if self.tokenizer_dir else None
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        recover_dir(self.run_dir / "best_model")  # what killed exports of best_model/ left: cleaned at once
        self.naming = NAMING  # the trial parameter names; open_study reads the study's (an old study keeps its own)

    def planned_methods(self) -> list[str]:
        """The methods this run's recipes use, which the engine plans memory for (``MergeEngine(methods=...)``):
        the space's, and linear (the baselines outside the space; a soup's every recipe)."""
        return [*(self.space.methods if self.space is not None else []), "linear"]

    def _check_stack_memory(self, slots: int) -> None:
        """Refuse a layer-stacking search whose largest stack (``slots`` layers, each the sources' largest) does not
        fit beside the loaded engine, before any trial builds one (:func:`evomerge.merge.check_stack_memory`)."""
        assert self.engine is not None
        checkpoints = dict(zip(self.engine.paths, self.engine.checkpoints))
        source = self.models.sources[0]
        largest = max(range(self.models.num_layers), key=lambda j: layer_stack_bytes(checkpoints, [(source, j)]))
        check_stack_memory(checkpoints, [(source, largest)] * slots, dtype=self.engine.dtype,
                           device=self.engine.device, live=True)

    def _template(self) -> MoeRecipe | None:
        """The run's MoE template with the run's seed and dtype (the recipes of its trials carry them), None without
        one; a soup or sweep has none (they merge sources)."""
        template = self.config.moe_template()
        if template is None:
            return None
        if self.kind != records.SEARCH_KIND:
            raise ValueError(f"template: an MoE template is searched with `evomerge search` (an MoE space); a "
                             f"{self.kind} merges base and sources")
        return self._with_run_settings(template)

    def _with_run_settings(self, recipe: _AnyRecipeT) -> _AnyRecipeT:
        """``recipe`` with the run's seed, and its dtype where the run sets one (an MoE recipe keeps its template's
        otherwise): what every recipe this run scores carries."""
        return recipe.model_copy(update={"seed": self.config.seed, "dtype": self.config.dtype or recipe.dtype})

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the display's live phase (an error's line follows a whole bar) and release the local study's lock (a
        killed process's lock is released by the kernel)."""
        self.progress.end()
        if self.lock is not None:
            self.lock.release()

    # ---------------------------------------------------------------------------------------------- study
    def open_study(self) -> optuna.Study:
        n_obj = len(self.evaluator.objective.metrics) if self.config.multi_objective else 1
        sampler = self.sampler(n_obj)
        storage = make_storage(self.config.storage_url, heartbeat_s=self.config.heartbeat_s,
                               grace_s=self.config.grace_s)
        if self.lock is not None and not self.lock.held:
            self.lock.acquire()
        study = optuna.create_study(
            storage=storage, study_name=self.config.name, sampler=sampler, pruner=make_pruner(self.config.pruner),
            directions=[self.evaluator.objective.direction] * n_obj, load_if_exists=True,
        )
        # a soup runs in one process whatever its storage: a RUNNING step is an orphan (it never sends heartbeats)
        recover(study, storage, exclusive=self.lock is not None or self.kind == records.SOUP_KIND,
                grace_s=self.config.grace_s, retry=self.kind in records.PARAMETER_KINDS)
        records.set_study_info(study, config=self.config.model_dump(mode="json"), num_layers=self.models.num_layers,
                               sources=self.models.sources, base=self.models.base, kind=self.kind,
                               space=Path(self.config.space).name if self.config.space else None,
                               objective=self.evaluator.objective.metrics, param_naming=NAMING)
        self.naming = records.param_naming(study)
        records.set_metric_names(study, objective_labels(self.evaluator.objective.metrics,
                                                         self.evaluator.objective.weights, n_obj))
        # readable by the owner only, and the password masked: run.json may sit on a shared file system
        fd = os.open(self.run_dir / "run.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a run.json written before this rule existed keeps its old mode otherwise
        with os.fdopen(fd, "w") as f:
            json.dump({"study_name": self.config.name, "storage": mask_url(self.config.storage_url)}, f, indent=2)
        return study

    def sampler(self, n_objectives: int) -> optuna.samplers.BaseSampler:
        """The study's sampler, from the config (a sweep's runner walks its grid instead)."""
        continuous = self.space.is_continuous() if self.space else False
        return make_sampler(self.config.sampler, seed=self.config.seed, continuous=continuous,
                            n_objectives=n_objectives)

    # ------------------------------------------------------------------------------------------- scoring
    def materialize(self, recipe: AnyRecipe) -> tuple[nn.Module, float]:
        """The model holding ``recipe`` and the merge time: the engine's (or an MoE search's) live model, written in
        place, or for layer stacking (a new layer count) a new model assembled from the sources' layers."""
        if isinstance(recipe, MoeRecipe):
            assert self.moe is not None, "an MoE recipe in a run without an MoE template"
            start = time.perf_counter()
            self.moe.materialize(recipe)
            return self.moe.model, time.perf_counter() - start
        assert self.engine is not None
        if isinstance(recipe, Recipe):
            prepare(self.engine, recipe, self.config.calibration, self.tokenizer)
            return self.engine.model, self.engine.materialize(recipe).seconds
        start = time.perf_counter()
        model = build_stacked_model(recipe, dict(zip(self.engine.paths, self.engine.checkpoints)),
                                    device=self.engine.device, dtype=self.engine.dtype)
        return model, time.perf_counter() - start

    def export(self, recipe: AnyRecipe, out: Path, card: Provenance) -> Path:
        """Write ``recipe``'s merged model as an HF dir (replacing ``out``) with the model card, recipes and metadata
        of ``card``."""
        if isinstance(recipe, MoeRecipe):
            assert self.moe is not None
            self.moe.materialize(recipe)
            return self.moe.export(out, force=True, provenance=card)
        assert self.engine is not None
        if isinstance(recipe, StackRecipe):
            return merge_to_dir(recipe, out, device=self.engine.device, force=True, card=card)
        self.engine.materialize(recipe)
        return self.engine.export(out, tokenizer_dir=self.tokenizer_dir, force=True, provenance=card)

    def score(self, recipe: AnyRecipe, trial: optuna.Trial | None = None, *, prunable: bool = False,
              penalty: float = 0.0) -> Scored:
        """Materialize ``recipe`` and score it. When ``prunable`` (a search trial with a pruner), the evaluator runs
        on the growing fidelity levels and reports each to ``trial`` (with the trial's ``penalty`` folded in, as in
        its final value); the pruner may stop it before the last level. Otherwise it is scored once, on every
        validation item."""
        deadline = self._deadline()
        model, merge_seconds = self.materialize(recipe)
        levels = self.config.fidelities if prunable and trial is not None else [1.0]
        for step, fidelity in enumerate(levels, start=1):  # resource = level 1, 2, ...: rung 0 is the first level
            result = evaluate(self.evaluator, model, self.tokenizer, fidelity=fidelity, deadline=deadline)
            if fidelity == 1.0:
                break
            assert trial is not None
            offset = self._penalized(0.0, penalty)
            if self.config.pruner == "wilcoxon" and result.items:
                self._report_items(trial, result, offset)
            else:
                trial.report(result.objective + offset, step)
            if trial.should_prune():
                records.set_metrics(trial, result.metrics)
                raise optuna.TrialPruned(f"pruned at fidelity {fidelity}")
        return Scored(recipe, result, merge_seconds)

    def _deadline(self) -> float | None:
        """When a trial starting now must be done (``trial_timeout_s``), None without a limit."""
        timeout = self.config.trial_timeout_s
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _report_items(trial: optuna.Trial, result: EvalResult, offset: float) -> None:
        items = [v for task in sorted(result.items or {}) for v in result.items[task]]
        for i, value in enumerate(items):
            trial.report(value + offset, i)

    def _penalized(self, score: float, penalty: float) -> float:
        """``score`` with a penalty folded in, in the study's direction (:func:`~evomerge.search.space.penalized`)."""
        return penalized(score, penalty, self.evaluator.objective.direction)

    def record(self, trial: optuna.Trial, recipe: AnyRecipe, kind: str, *,
               penalty: float | None = None) -> float | list[float]:
        """Score ``recipe`` as ``trial``, storing recipe, metrics and timings; errors are stored then re-raised.
        ``penalty`` (the space's L1 penalty of the trial's weights): the value returned is the score with it folded
        in, and the trial keeps both."""
        records.set_started(trial, recipe, kind)
        prunable = self.config.pruner != "none" and kind == records.SEARCH_KIND
        try:
            scored = self.score(recipe, trial, prunable=prunable, penalty=penalty or 0.0)
        except optuna.TrialPruned:
            raise
        except (Exception, KeyboardInterrupt) as exc:  # Ctrl-C: the trial fails (not RUNNING), the run stops
            records.set_error(trial, f"{type(exc).__name__}: {exc}")
            raise
        records.set_scored(trial, scored.result.metrics, scored.merge_seconds, scored.result.seconds)
        if self.config.multi_objective:
            return scored.result.objectives
        if penalty is None:
            return scored.result.objective
        records.set_penalty(trial, scored.result.objective, penalty)
        return self._penalized(scored.result.objective, penalty)

    # ------------------------------------------------------------------------------------------- search
    def objective(self, trial: optuna.Trial) -> float | list[float]:
        assert self.space is not None
        try:
            recipe = self.space.suggest(trial, self.models, self.naming)
            penalty = self.space.penalty_of(trial.params, self.models, self.naming)
        except Exception as exc:  # stored like any failure: a FAIL without 'error' would read as interrupted
            records.set_error(trial, f"{type(exc).__name__}: {exc}")
            raise
        return self.record(trial, self._with_run_settings(recipe), trial_kind(trial), penalty=penalty)

    def enqueue_baselines(self, study: optuna.Study) -> None:
        if not self.config.baselines or records.baselines_enqueued(study) or self.space is None:
            return
        for label, params in self.space.baseline_params(self.models, self.naming):
            study.enqueue_trial(params, user_attrs={records.KIND: records.baseline_kind(label)}, skip_if_exists=True)
        records.mark_baselines_enqueued(study)

    def score_references(self, study: optuna.Study) -> None:
        """Score, once per study, the baselines the space cannot express (:meth:`SearchSpace.reference_recipes`) on
        the validation split; each goes into the study's user_attrs as ``reference:<label>`` = ``{recipe, metrics,
        values, merge_seconds, eval_seconds}`` (not a trial: its parameters are outside the sampler's space)."""
        if not self.config.baselines or self.space is None:
            return
        scored_already = records.references(study.user_attrs)
        todo = [(label, recipe) for label, recipe in self.space.reference_recipes(self.models)
                if label not in scored_already]
        if todo:  # one 'baselines' phase: these, then the queued baseline trials (optimize goes on counting)
            self.progress.start("baselines", len(todo) + len(self._waiting_baselines(study)))
        for label, recipe in todo:
            recipe = self._with_run_settings(recipe)
            try:
                scored = self.score(recipe)
            except Exception as exc:  # a reference is no trial: its failure is stored beside the study, once
                log.warning("reference %s failed: %s", label, records.describe(exc))
                records.set_reference_error(study, label, recipe=recipe, error=exc)
                continue
            finally:
                self.progress.advance()
            values = scored.result.objectives if self.config.multi_objective else [scored.result.objective]
            records.set_reference(study, label, recipe=recipe, metrics=scored.result.metrics, values=values,
                                  merge_seconds=scored.merge_seconds, eval_seconds=scored.result.seconds)

    @staticmethod
    def _waiting_baselines(study: optuna.Study) -> list[FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if records.is_baseline(t)]

    def optimize(self, study: optuna.Study, *, n_trials: int | None = None, progress: bool = True) -> None:
        """Run trials until the study holds ``n_trials`` finished (complete or pruned) *search* trials; the baselines
        run on top of them (first: they are queued), failed trials do not count, and a round in which every trial
        fails ends the run (the failures are in the study and report). ``progress=False``: this call's phases are
        not shown, whatever the runner's display does."""
        target = n_trials or self.config.n_trials
        finished = (TrialState.COMPLETE, TrialState.PRUNED)

        def progressed() -> int:
            return len(study.get_trials(deepcopy=False, states=finished))

        trials = study.get_trials(deepcopy=False)
        scored = sum(records.is_baseline(t) and t.state in finished for t in trials)
        waiting = len(self._waiting_baselines(study))
        done = self.finished(study)
        log.info("%s", trial_plan(target, scored + waiting, len(records.references(study.user_attrs)), done))
        shown = self.progress.enabled and progress
        # the display shows each trial's outcome; Optuna's INFO line repeats every parameter of it
        quiet = quiet_optuna() if shown else contextlib.nullcontext()
        failures = logging.getLogger("optuna.study._optimize")  # the logger of Optuna's "Trial N failed" lines
        one_line = _OneLineFailures()
        failures.addFilter(one_line)
        callbacks: list[Callback] = [_stop_at(target, lambda: self.finished(study)), self._count_trial(target),
                                     _stop_when_full(one_line, self.config.storage_url), *self.callbacks]
        started = time.monotonic()
        with quiet, contextlib.ExitStack() as stack:  # the display's phase ends however the loop ends
            stack.callback(setattr, self.progress, "enabled", self.progress.enabled)
            stack.callback(self.progress.end)
            stack.callback(failures.removeFilter, one_line)
            self.progress.enabled = shown
            if not waiting:
                self.progress.start(f"{self.kind} trials", target, done=done)
            elif self.progress.label != "baselines":  # else score_references started it: the references came first
                self.progress.start("baselines", waiting)
            while done < target:
                timeout = None if self.config.timeout is None else self.config.timeout - (time.monotonic() - started)
                if timeout is not None and timeout <= 0:
                    break
                before = progressed()
                study.optimize(self.objective, n_trials=target - done + waiting, timeout=timeout, callbacks=callbacks,
                               catch=(Exception,), gc_after_trial=False)
                full = None if one_line.last is None else storage_full(one_line.last, self.config.storage_url)
                if full is not None:  # stopped at once (_stop_when_full): the trials' errors cannot be stored either
                    raise full
                before_done, done, waiting = done, self.finished(study), 0
                if done == before_done and progressed() == before:
                    log.warning("every trial of the last round failed; stopping (see the trials' 'error')")
                    break

    def _count_trial(self, target: int) -> Callback:
        """Advance the display after each finished trial: the 'baselines' phase while the queued baselines run (they
        run first), then '<kind> trials', which counts what :meth:`finished` counts (failures do not use the budget),
        with the best value so far and the last trial's state."""

        def update(study: optuna.Study, trial: FrozenTrial) -> None:
            bar = self.progress.bar
            if bar is None:
                return
            if self.progress.label == "baselines":
                if records.is_baseline(trial):
                    bar.update(1)
                    if bar.n >= (bar.total or 0):
                        self.progress.start(f"{self.kind} trials", target, done=self.finished(study))
                return
            bar.update(self.finished(study) - bar.n)
            bar.set_postfix(best=_best_so_far(study), state=trial.state.name)

        return update

    def finished(self, study: optuna.Study) -> int:
        """How much of the budget the study has used: its complete and pruned *search* trials (baselines run on top;
        failures do not count)."""
        return sum(trial_kind(t) == records.SEARCH_KIND
                   for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    # ----------------------------------------------------------------------------------------- finalize
    def test_score(self, test: Evaluator, recipe: AnyRecipe, what: str) -> EvalResult | Exception:
        """``recipe``'s result on an evaluator outside the search (test split, confirmation), or the error that
        prevented it (stored in its row: one failure loses one cell)."""
        try:
            model, _ = self.materialize(recipe)
            return evaluate(test, model, self.tokenizer, deadline=self._deadline())
        except Exception as exc:
            log.warning("test scoring of %s failed: %s", what, records.describe(exc))
            return exc

    def confirm(self, study: optuna.Study) -> dict[int, float]:
        """Re-score the ``confirm_top`` best completed trials (baselines included) on the confirmation evaluator
        (:meth:`RunConfig.confirm_spec`: every validation doc by default) and return number -> confirmed objective;
        :func:`~evomerge.search.trials.best_trials` then picks the result among them. A small ``limit`` makes
        trials cheap but the best of many noisy scores is biased upwards (the winner's curse); re-scoring the few
        best on more docs picks among them on a less noisy estimate, still without touching the test split.
        Resumable: trials already re-scored are not scored again; a failed re-score leaves that trial out."""
        k = self.config.confirm_top
        if not k:
            return {}
        sign = direction_sign(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        top = sorted(complete, key=lambda t: (-sign * t.values[0], t.number))[:k]
        done = records.confirmed(study.user_attrs)
        todo = [t for t in top if t.number not in done]
        if todo:
            evaluator = build_evaluator(self.config.confirm_spec())
            with self.progress.phase("confirm", len(todo)) as bar:
                for trial in todo:
                    result = self.test_score(evaluator, records.recipe_of(trial),
                                             f"confirmation of trial #{trial.number}")
                    if not isinstance(result, Exception):  # ranked as the search ranks: with its penalty
                        objective = self._penalized(result.objective, records.trial_penalty(trial) or 0.0)
                        records.set_confirm_result(study, trial.number, result.metrics, objective)
                    bar.update(1)
        return records.confirmed(study.user_attrs)

    def finalize(self, study: optuna.Study, *, export: bool = True) -> dict[str, Any]:
        """The study's result (:func:`~evomerge.search.trials.best_trials`: the best trial, or a soup's greedy soup) as
        evomerge + mergekit YAML and a merged HF dir, and test-split scores of it, the baselines and the
        references."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise records.StudyFailed(f"study {study.study_name} has no completed trial")
        best = best_trials(study, complete)[0]
        recipe = records.recipe_of(best)
        recipe.to_yaml(self.run_dir / "best_recipe.yaml")
        if not isinstance(recipe, MoeRecipe) or mergekit_exportable(recipe):  # an MoE: mergekit-moe's config
            (self.run_dir / "best_recipe.mergekit.yaml").write_text(to_mergekit_yaml(recipe))
        else:  # a resumed study's earlier best may have had one
            (self.run_dir / "best_recipe.mergekit.yaml").unlink(missing_ok=True)
        test = build_evaluator(self.config.test_spec())
        targets = {t.number: t for t in complete
                   if records.is_baseline(t) or t.number == best.number}
        summary: dict[str, Any] = {"best_trial": best.number, "best_value": best.values[0], "test": {}}
        confirmed = records.confirmed(study.user_attrs)
        if confirmed:
            summary["confirmed"] = {str(number): value for number, value in sorted(confirmed.items())}

        scores = [SplitScores("validation", records.trial_metrics(best))]
        # a reference whose validation scoring failed has nothing to test
        references = {label: reference for label, reference in records.references(study.user_attrs).items()
                      if records.RECIPE in reference and records.ERROR not in reference}
        with self.progress.phase("test scoring", len(targets) + len(references), unit="recipe") as bar:
            for number, trial in sorted(targets.items(), key=lambda kv: kv[1].number != best.number):
                result = self.test_score(test, records.recipe_of(trial), f"trial #{number}")
                if number == best.number and not isinstance(result, Exception):
                    scores.append(SplitScores("test", result.metrics, result.stderr or {}))
                if isinstance(result, Exception):
                    records.set_test_error(study, number, result)
                else:
                    records.set_test_result(study, number, result.metrics, result.objective, result.stderr)
                summary["test"][f"{number}:{trial_kind(trial)}"] = getattr(result, "objective", None)
                bar.update(1)
            for label, reference in references.items():
                result = self.test_score(test, parse_recipe(reference[records.RECIPE]), f"reference {label}")
                if isinstance(result, Exception):
                    records.set_reference_test(study, label, error=result)
                else:
                    records.set_reference_test(study, label, metrics=result.metrics, objective=result.objective,
                                                stderr=result.stderr)
                summary["test"][records.reference_key(label)] = getattr(result, "objective", None)
                bar.update(1)
        if export:
            origin = (f"Found by `evomerge {self.kind}`: study `{study.study_name}`, trial #{best.number} "
                      f"({trial_kind(best)}); chosen on the validation split"
                      + (f" (the {len(confirmed)} best re-scored on more validation docs)." if confirmed else "."))
            out = self.run_dir / "best_model"
            with self.progress.phase("export"):
                self.export(recipe, out, provenance(recipe, name=out.name, scores=scores, origin=origin))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


class _OneLineFailures(logging.Filter):
    """Optuna logs each failed trial with all its parameters and the full traceback (and a second line "failed with
    value None"); evomerge prints one line per failure instead: the trial's ``error`` attr and the report keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.last: BaseException | None = None  # the exception of the last failed trial

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.last = record.exc_info[1]
            number = re.match(r"Trial (\d+)", record.getMessage())
            record.msg = f"Trial {number.group(1) if number else '?'} failed: {records.describe(record.exc_info[1])}"
            record.args, record.exc_info, record.exc_text = (), None, None
            return True
        return re.fullmatch(r"Trial \d+ failed with value None\.", record.getMessage()) is None


def trial_plan(n_trials: int, baselines: int, references: int, done: int = 0) -> str:
    """The line a run starts with: ``40 searched trials + 6 baselines`` (``n_trials`` counts searched trials only),
    the references scored beside the study and the searched trials a resumed study holds already."""
    line = f"{n_trials} searched trials + {baselines} baseline{'s' * (baselines != 1)}"
    if references:
        line += f" (+ {references} reference{'s' * (references != 1)} outside the space, scored beside the study)"
    return line + (f"; {done} searched already" if done else "")


def _stop_at(n_trials: int, searched: Callable[[], int]) -> Callback:
    """Stop the study (this process's optimize loop) once it holds ``n_trials`` finished searched trials."""

    def stop(study: optuna.Study, trial: FrozenTrial) -> None:
        if searched() >= n_trials:
            study.stop()

    return stop


def _stop_when_full(failures: _OneLineFailures, url: str) -> Callback:
    """Stop the study at the first trial that failed because its storage is out of space (every later one would)."""

    def stop(study: optuna.Study, trial: FrozenTrial) -> None:
        if failures.last is not None and storage_full(failures.last, url) is not None:
            study.stop()

    return stop


def _best_so_far(study: optuna.Study) -> str:
    """The study's best first objective value, ``-`` before any trial completed."""
    try:
        sign = direction_sign(study)
        return f"{sign * max(sign * t.values[0] for t in study.best_trials):.4f}"
    except (ValueError, RuntimeError):
        return "-"


def run_search(config: RunConfig, *, progress: bool = True, export: bool = True) -> dict[str, Any]:
    """``evomerge search``: open/resume the study, enqueue baselines, optimize, finalize, write the report."""
    with Runner(config, progress=progress) as runner:
        study = runner.open_study()
        runner.enqueue_baselines(study)
        runner.score_references(study)
        runner.optimize(study)
        runner.confirm(study)
        return finish(runner, study, export=export)


def finish(runner: Runner, study: optuna.Study, *, export: bool) -> dict[str, Any]:
    """Finalize and write the report; with no completed trial, write the report (it lists the failures) and raise
    :class:`~evomerge.search.trials.StudyFailed` with one line."""
    try:
        summary = runner.finalize(study, export=export)
    except records.StudyFailed as exc:
        _fail(runner, study, str(exc))
    summary["report"] = str(_report(runner, study))
    return summary


def _report(runner: Runner, study: optuna.Study) -> Path:
    from evomerge.report import write_report

    with runner.progress.phase("report"):
        return write_report(study, runner.run_dir / "report", title=runner.config.name, run_dir=runner.run_dir)


def _fail(runner: Runner, study: optuna.Study, why: str) -> NoReturn:
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    example = f", e.g. #{failed[-1].number}: {_first_line(records.trial_error(failed[-1]))}" if failed else ""
    raise records.StudyFailed(f"{why} ({len(failed)} failed trial(s){example}); the report lists every failure: "
                              f"{_report(runner, study)}") from None


def _first_line(text: str | None) -> str:
    return (text or "no error stored").strip().splitlines()[0]


def run_soup(config: RunConfig, *, progress: bool = True, export: bool = True) -> dict[str, Any]:
    """``evomerge soup``: greedy soup of the config's sources (each step a trial), uniform soup beside it, test
    scores of every ingredient, both soups, and the report. Re-running resumes: scored recipes are not re-scored."""
    from evomerge.search.soup import greedy_soup, recipe_key

    if config.pruner != "none":
        raise ValueError("soups evaluate every step fully; set pruner: none")
    with Runner(config, study_kind=records.SOUP_KIND, progress=progress) as runner:
        study = runner.open_study()
        trials = {recipe_key(records.recipe_of(t)): t
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        bar = runner.progress.start("soup steps", 2 * len(config.sources), done=len(trials))

        def kind(recipe: Recipe) -> str:
            if len(recipe.sources) == 1:
                return records.baseline_kind(f"source:{Path(recipe.sources[0].model).name}")
            if {s.model for s in recipe.sources} == set(config.sources):
                return records.baseline_kind("uniform")
            return records.soup_kind(len(recipe.sources))

        def score(recipe: Recipe) -> float:
            # Optuna: heartbeats are meant for optimize (a killed soup's step is failed and re-scored on resume)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = study.ask()
            try:
                value = runner.record(trial, recipe, kind(recipe))
            except BaseException:  # Ctrl-C included: the step fails, it is not left RUNNING
                study.tell(trial, state=TrialState.FAIL)
                raise
            frozen = study.tell(trial, value)
            for callback in runner.callbacks:  # as study.optimize calls them after each trial
                callback(study, frozen)
            trials[recipe_key(recipe)] = frozen
            bar.update(1)
            bar.set_postfix(last=f"{value:.4f}")
            return value

        # greedy_soup maximizes: a lower-is-better objective (e.g. perplexity) is handed to it negated
        sign = direction_sign(study)
        done = {key: sign * t.value for key, t in trials.items()}
        try:  # a soup cannot skip a step: its first failure ends it (re-run to retry the step)
            result = greedy_soup(config.sources, lambda recipe: sign * score(recipe), accept=config.accept,
                                 done=done)
            uniform = result.uniform_recipe()
            if recipe_key(uniform) not in trials:
                score(uniform)
        except Exception as exc:
            _fail(runner, study, f"a soup step failed ({records.describe(exc)})")
        finally:
            runner.progress.end()
        greedy = trials[recipe_key(result.greedy_recipe())]
        kept = [Path(m).name for m in result.kept]
        records.set_greedy(study, trial=greedy.number, kept=kept, of=len(config.sources))
        summary = finish(runner, study, export=export)
        summary.update(kept=kept, greedy_trial=greedy.number,
                       individual={Path(m).name: sign * v for m, v in result.individual_scores.items()})
        return summary


def run_worker(storage: str, study_name: str, *, n_trials: int | None = None, device: str | None = None,
               progress: bool = True) -> None:
    """``evomerge worker``: join a study whose run config is stored in it, and run trials until it holds
    ``n_trials`` (default: the config's) finished ones. Each worker reseeds its sampler: with the config's seed in
    every process, random, TPE and NSGA-II samplers would propose the same parameters in each worker."""
    check_storage(storage, must_exist=True)  # a mistyped SQLite path must not become an empty database
    if study_name not in optuna.study.get_all_study_names(storage=storage):
        raise ValueError(f"no study named {study_name!r} in {mask_url(storage)}; start it with `evomerge search` "
                         "first")
    info = records.study_info(optuna.load_study(study_name=study_name, storage=storage))
    if info[records.KIND] not in records.PARAMETER_KINDS or info[records.CONFIG] is None:
        raise ValueError(f"study {study_name!r} holds no `evomerge search` run config (kind: {info[records.KIND]}); "
                         "workers join searches and sweeps (a soup runs in one process; a study being created: retry)")
    overrides = {"storage": storage, **({"device": device} if device else {})}
    if info[records.KIND] == records.SWEEP_KIND:
        from evomerge.search.sweep import SweepConfig, SweepRunner

        sweep = SweepConfig.model_validate({**info[records.CONFIG], **overrides})
        runner: Runner = SweepRunner(sweep, progress=progress)
    else:
        runner = Runner(RunConfig.model_validate({**info[records.CONFIG], **overrides}), progress=progress)
    with runner:
        study = runner.open_study()
        study.sampler.reseed_rng()
        runner.optimize(study, n_trials=n_trials, progress=progress)
