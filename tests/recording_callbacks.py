"""Optuna callback factories for tests of the run config's ``callbacks:`` entries (``module:factory``)."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

#: What the callbacks made by :func:`recorder` saw: (trial number, state name, value), in call order.
SEEN: list[tuple[int, str, float | None]] = []


def recorder() -> Callable[[optuna.Study, FrozenTrial], None]:
    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        SEEN.append((trial.number, trial.state.name, trial.value))

    return record


def not_a_factory() -> int:
    return 3
