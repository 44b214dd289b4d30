"""Optuna callback factories for tests of the run config's ``callbacks:`` entries (``module:factory``)."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

#: What the callbacks made by :func:`recorder` saw: (trial number, state name, value), in call order.
SEEN: list[tuple[int, str, float | None]] = []
#: ... and what a tracker (optuna-integration's MLflowCallback / WeightsAndBiasesCallback) logs of each trial: its
#: parameters and its user attributes.
LOGGED: list[tuple[dict[str, object], dict[str, object]]] = []


def recorder() -> Callable[[optuna.Study, FrozenTrial], None]:
    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        SEEN.append((trial.number, trial.state.name, trial.value))
        LOGGED.append((dict(trial.params), dict(trial.user_attrs)))

    return record


def not_a_factory() -> int:
    return 3
