"""CMA-ES with IPOP restarts as an Optuna sampler, on top of the ``cmaes`` library.

Optuna >= 4.4 ignores ``CmaEsSampler(restart_strategy=...)`` (restarts moved to OptunaHub, which needs network
access at run time), so the restart loop lives here. The optimizer state is kept in the study itself, so a study
resumed from SQLite / PostgreSQL, or shared by several workers, continues the same CMA-ES run.
"""

from __future__ import annotations

import itertools
import logging
import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple

import cmaes
import numpy as np
import optuna
from optuna._transform import _SearchSpaceTransform
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

_PREFIX = "ipop_cma:"
_TAG = f"{_PREFIX}tag"  # {"restart", "generation", "popsize"} of a trial this sampler generated
_STATE = f"{_PREFIX}state"  # [restart, generation, number of chunks] of the optimizer pickled on that trial
_CHUNK = f"{_PREFIX}optimizer:"
_CHUNK_LENGTH = 2045  # a chunk's JSON value stays under 2048 characters, like Optuna's CmaEsSampler keeps it
_ASK_STREAM, _RESTART_STREAM = 0, 1  # separate random streams derived from the sampler's seed


class _Run(NamedTuple):
    """One CMA-ES run of the restart sequence: its index (0 = the first run) and its optimizer."""

    restart: int
    optimizer: cmaes.CMA


class RestartCmaEsSampler(BaseSampler):
    """CMA-ES with IPOP restarts (IPOP-CMA-ES) for single-objective studies over float and int parameters.

    Algorithm: CMA-ES (Hansen & Ostermeier 2001, "Completely Derandomized Self-Adaptation in Evolution
    Strategies", Evolutionary Computation 9(2)) samples each generation of ``popsize`` candidates from a normal
    distribution and updates its mean, step size and covariance from the ranked results. When the optimizer's
    ``should_stop()`` fires (function values flat, step size or covariance degenerate), the run is restarted
    from a fresh uniformly random mean with the population size multiplied by ``inc_popsize`` (Auger & Hansen
    2005, "A Restart CMA Evolution Strategy With Increasing Population Size", IEEE CEC). Larger populations
    average over more of a multimodal landscape, so later runs find broader basins. The first run starts at the
    centre of the space.

    Parameters are searched in Optuna's [0, 1] transformed space (log and step scales applied, ints rounded on
    the way back). The relative search space is the intersection of all completed trials' float and int
    distributions. Categorical parameters, every trial until ``n_startup_trials`` trials have completed, and the
    free parameters of enqueued trials go to ``independent_sampler`` (random by default): enqueued trials (e.g.
    baselines) are no CMA-ES samples, so they are never told.

    Bookkeeping, stored in the study so a resumed study or several workers continue the same run: every trial
    this sampler generates records (restart, generation, popsize) in its system attrs. Generation ``g`` of run
    ``r`` is told once the study holds ``popsize`` COMPLETE trials tagged ``(r, g)`` (the first ``popsize`` by
    trial number); pruned and failed ones do not count, and are replaced by further asks from the same
    generation. The trial whose sampling told a generation (or started a restart) stores the pickled optimizer.
    Each ask is seeded from the sampler's seed and the trial number, each restart's mean from the seed and the
    restart index, so the same seed gives the same proposals.
    """

    def __init__(self, *, seed: int | None = None, popsize: int | None = None, inc_popsize: int = 2,
                 n_startup_trials: int = 1, independent_sampler: BaseSampler | None = None,
                 sigma0: float | None = None) -> None:
        if inc_popsize < 1:
            raise ValueError(f"inc_popsize must be >= 1, got {inc_popsize}")
        self._seed = seed if seed is not None else int(np.random.SeedSequence().entropy)
        self._popsize = popsize
        self._inc_popsize = inc_popsize
        self._n_startup_trials = n_startup_trials
        self._independent_sampler = independent_sampler or RandomSampler(seed=seed)
        self._sigma0 = sigma0
        self._search_space = IntersectionSearchSpace()
        self._warned_dynamic = False

    def reseed_rng(self) -> None:
        """Reseed the independent sampler. CMA-ES draws need no reseeding: each ask is seeded by its trial
        number (distinct across workers), and each restart's mean by its index (the same in every worker)."""
        self._independent_sampler.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The float and int parameters of every completed trial that can take more than one value."""
        return {name: dist for name, dist in self._search_space.calculate(study).items()
                if isinstance(dist, (FloatDistribution, IntDistribution)) and not dist.single()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """Ask the current generation for ``trial``'s parameters, first telling a finished generation and
        restarting a stopped run; ``{}`` (independent sampling) for enqueued trials and startup trials."""
        self._raise_error_if_multi_objective(study)
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}
        trials = study.get_trials(deepcopy=False)
        if not _has_complete(trials, self._n_startup_trials):
            return {}
        trans = _SearchSpaceTransform(search_space, transform_0_1=True)
        run = _restore(trials) or self._start(trans, restart=0, popsize=self._popsize)
        if run.optimizer.dim != len(trans.bounds):
            self._warn_dynamic_space()
            return {}
        advanced = self._advance(run, _solutions(trials, run, search_space, trans, study.direction), trans)
        if advanced is not None:
            run = advanced
            _save(study, trial, run)
        return self._ask(study, trial, run, trans)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        self._raise_error_if_multi_objective(study)
        return self._independent_sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._independent_sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._independent_sampler.after_trial(study, trial, state, values)

    # ------------------------------------------------------------------------------------------------ runs
    def _rng(self, stream: int, index: int) -> np.random.Generator:
        """A generator that depends only on the seed, the stream and ``index`` (not on the process's history)."""
        return np.random.default_rng([self._seed, stream, index])

    def _start(self, trans: _SearchSpaceTransform, *, restart: int, popsize: int | None) -> _Run:
        """Run ``restart`` of the sequence: the first from the centre of the space, later ones from a uniformly
        random mean (Auger & Hansen 2005)."""
        low, high = trans.bounds[:, 0], trans.bounds[:, 1]
        mean = (low + high) / 2 if restart == 0 else self._rng(_RESTART_STREAM, restart).uniform(low, high)
        sigma0 = self._sigma0 if self._sigma0 is not None else float(np.min(high - low)) / 6
        optimizer = cmaes.CMA(mean=mean, sigma=max(sigma0, 1e-10), bounds=trans.bounds,
                              n_max_resampling=10 * len(mean), population_size=popsize)
        return _Run(restart, optimizer)

    def _advance(self, run: _Run, solutions: list[tuple[np.ndarray, float]],
                 trans: _SearchSpaceTransform) -> _Run | None:
        """Tell ``run``'s current generation its first ``popsize`` ``solutions`` if there are that many, then
        restart with a larger population if the optimizer should stop; None while the generation is evaluated."""
        optimizer = run.optimizer
        if len(solutions) < optimizer.population_size:
            return None
        optimizer.tell(solutions[:optimizer.population_size])
        if not optimizer.should_stop():
            return run
        popsize = optimizer.population_size * self._inc_popsize
        log.info("CMA-ES run %d stopped at generation %d; restarting with population %d", run.restart,
                 optimizer.generation, popsize)
        return self._start(trans, restart=run.restart + 1, popsize=popsize)

    def _ask(self, study: optuna.Study, trial: FrozenTrial, run: _Run,
             trans: _SearchSpaceTransform) -> dict[str, Any]:
        """Sample ``trial``'s parameters from ``run`` and tag the trial with the generation they belong to."""
        optimizer = run.optimizer
        optimizer.reseed_rng(int(self._rng(_ASK_STREAM, trial.number).integers(2**32)))
        x = optimizer.ask()
        study._storage.set_trial_system_attr(trial._trial_id, _TAG, {
            "restart": run.restart, "generation": optimizer.generation, "popsize": optimizer.population_size})
        return trans.untransform(x)

    def _warn_dynamic_space(self) -> None:
        if not self._warned_dynamic:
            log.warning("the search space changed size during the study; RestartCmaEsSampler falls back to "
                        "independent sampling")
            self._warned_dynamic = True


# ----------------------------------------------------------------------------------------- trials and storage
def _has_complete(trials: list[FrozenTrial], n: int) -> bool:
    """Whether at least ``n`` of ``trials`` are COMPLETE (stops counting at ``n``: this runs for every trial)."""
    complete = (t for t in trials if t.state == TrialState.COMPLETE)
    return sum(1 for _ in itertools.islice(complete, n)) == n


def _solutions(trials: list[FrozenTrial], run: _Run, search_space: dict[str, BaseDistribution],
               trans: _SearchSpaceTransform, direction: StudyDirection) -> list[tuple[np.ndarray, float]]:
    """(transformed params, value to minimize) of the COMPLETE trials of ``run``'s current generation, in trial
    number order (the storage's order); trials missing a searched parameter (conditional spaces) are left out."""
    sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
    key = (run.restart, run.optimizer.generation)
    return [(trans.transform(t.params), sign * float(t.value)) for t in trials
            if t.state == TrialState.COMPLETE and _generation_of(t) == key and search_space.keys() <= t.params.keys()]


def _generation_of(trial: FrozenTrial) -> tuple[int, int] | None:
    """(restart, generation) of a trial this sampler generated, None for any other trial."""
    tag = trial.system_attrs.get(_TAG)
    return None if tag is None else (tag["restart"], tag["generation"])


def _save(study: optuna.Study, trial: FrozenTrial, run: _Run) -> None:
    """Pickle ``run``'s optimizer into ``trial``'s system attrs, as hex chunks that fit an RDB attr value, then
    write the state marker (readers trust only trials that have it, so a half-written pickle is never read).

    Pickle is safe here: the bytes are our own optimizer, written by this sampler into our own study storage."""
    blob = pickle.dumps(run.optimizer).hex()
    chunks = [blob[i:i + _CHUNK_LENGTH] for i in range(0, len(blob), _CHUNK_LENGTH)]
    for i, chunk in enumerate(chunks):
        study._storage.set_trial_system_attr(trial._trial_id, f"{_CHUNK}{i}", chunk)
    study._storage.set_trial_system_attr(trial._trial_id, _STATE,
                                         [run.restart, run.optimizer.generation, len(chunks)])


def _restore(trials: list[FrozenTrial]) -> _Run | None:
    """The most advanced saved run (highest restart, then generation) in the study, or None before the first
    tell. Taking the maximum, not the latest trial, keeps workers that raced on a tell on the same run."""
    saved = [t for t in trials if _STATE in t.system_attrs]
    if not saved:
        return None
    latest = max(saved, key=lambda t: (t.system_attrs[_STATE][0], t.system_attrs[_STATE][1], -t.number))
    restart, _, n_chunks = latest.system_attrs[_STATE]
    blob = "".join(latest.system_attrs[f"{_CHUNK}{i}"] for i in range(n_chunks))
    return _Run(restart, pickle.loads(bytes.fromhex(blob)))  # our own state, from our own study: see _save
