"""Experiment trackers behind a run config's ``callbacks:`` (README "Tracking with MLflow or W&B"): trial names they
accept.

evomerge names trial parameters for what they are, ``weight[expert_math][layers 8-15]`` (:mod:`evomerge.search.space`),
and metrics as lm-eval reports them, ``val/gsm8k/exact_match,strict-match`` (a user attribute of the trial). MLflow
refuses parameter, metric and tag names with characters outside letters, digits and ``_ - . / : space``
(``mlflow.utils.validation``), so optuna-integration's ``MLflowCallback`` would fail at the first trial;
:func:`tracker_safe` hands it each trial under names it accepts. W&B takes evomerge's names as they are.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

Callback = Callable[[optuna.Study, FrozenTrial], None]


def tracker_name(name: str) -> str:
    """``name`` in the characters MLflow accepts, still readable: each ``[...]`` becomes a ``/``-separated part
    (``weight[expert_math][layers 8-15]`` -> ``weight/expert_math/layers 8-15``), a metric's ``,filter`` becomes
    ``:filter``, any other refused character ``_``."""
    name = re.sub(r"\[([^\]]*)\]", r"/\1", name).replace(",", ":")
    return re.sub(r"[^\w./: -]", "_", name)


def tracker_trial(trial: FrozenTrial) -> FrozenTrial:
    """A copy of ``trial`` with :func:`tracker_name` parameter, distribution and user-attribute names (the study's
    own trial is not changed)."""
    renamed = copy.copy(trial)
    renamed.params = {tracker_name(key): value for key, value in trial.params.items()}
    renamed.distributions = {tracker_name(key): value for key, value in trial.distributions.items()}
    renamed.user_attrs = {tracker_name(key): value for key, value in trial.user_attrs.items()}
    return renamed


def tracker_safe(callback: Callback) -> Callback:
    """``callback`` (e.g. ``MLflowCallback(...)``) called with :func:`tracker_trial` of each finished trial."""

    def call(study: optuna.Study, trial: FrozenTrial) -> None:
        callback(study, tracker_trial(trial))

    return call
