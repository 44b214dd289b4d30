"""What every evaluator shares: the result type, the objective spec, the protocol and the fidelity subsets.

An evaluator scores the *live* model object that the merge engine writes into: it never copies the model,
puts it in eval mode and runs under :func:`torch.inference_mode` (see :func:`scoring_mode`).

Fidelity ``f`` in ``(0, 1]`` selects a nested, deterministic subset of the evaluation items: the first
``ceil(f * n)`` items of a seeded permutation of the ``n`` items (:func:`seeded_order`, :func:`fidelity_count`).
A lower fidelity's items are therefore a prefix of a higher fidelity's, and position ``i`` of a per-item score
list is the same item at every fidelity, which is what Optuna's ``WilcoxonPruner`` needs (it pairs the
per-instance scores of two trials by instance id).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[Direction, ...] = ("maximize", "minimize")


class EvaluationError(ValueError):
    """A misconfigured evaluation (unknown task, missing data file, metric not produced, bad callable, ...).

    Raised before any model is run wherever the problem can be seen from the configuration; the message names
    the problem and the fix.
    """


@dataclass(frozen=True)
class Objective:
    """Which metrics make up the score and how they combine.

    ``objective = sum_i w_i * m_i / sum_i w_i`` over the chosen metric values ``m_i`` (equal weights when
    ``weights`` is None); ``objectives`` is the vector ``[m_1, ..., m_k]`` for multi-objective search. All chosen
    metrics share one ``direction`` (mixing "higher is better" with "lower is better" in one mean is meaningless).
    """

    metrics: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    direction: Direction = "maximize"

    def __post_init__(self) -> None:
        if not self.metrics:
            raise EvaluationError("Objective needs at least one metric name")
        if len(set(self.metrics)) != len(self.metrics):
            raise EvaluationError(f"Objective metrics contain duplicates: {list(self.metrics)}")
        if self.direction not in DIRECTIONS:
            raise EvaluationError(f"Objective direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.metrics):
                raise EvaluationError(
                    f"Objective has {len(self.metrics)} metrics {list(self.metrics)} but {len(self.weights)} "
                    "weights; give one weight per metric"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise EvaluationError(f"Objective weights must be finite, >= 0 and not all 0, got {self.weights}")

    @classmethod
    def build(
        cls,
        metrics: Sequence[str],
        weights: Sequence[float] | Mapping[str, float] | None = None,
        direction: Direction = "maximize",
    ) -> Objective:
        """An objective from metric names and weights given as a list (aligned with ``metrics``) or a mapping.

        A mapping must name only metrics in ``metrics``; metrics it leaves out get weight 0.
        """
        names = tuple(metrics)
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise EvaluationError(
                    f"weights name metrics {unknown} that are not scored; scored metrics: {list(names)}"
                )
            return cls(names, tuple(float(weights.get(m, 0.0)) for m in names), direction)
        return cls(names, None if weights is None else tuple(float(w) for w in weights), direction)

    def values(self, metrics: Mapping[str, float]) -> list[float]:
        """The chosen metric values, in the objective's order (the multi-objective vector)."""
        missing = [m for m in self.metrics if m not in metrics]
        if missing:
            raise EvaluationError(f"metrics {missing} were not produced; produced metrics: {sorted(metrics)}")
        return [float(metrics[m]) for m in self.metrics]

    def combine(self, values: Sequence[float]) -> float:
        """Weighted mean ``sum_i w_i v_i / sum_i w_i`` (plain mean without weights)."""
        weights = self.weights or (1.0,) * len(values)
        return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


@dataclass
class EvalResult:
    """One evaluation of one candidate.

    ``metrics``: every metric the evaluator produced (keys like ``"zoo_add/acc"``); ``objective``: the
    :class:`Objective`'s weighted mean; ``objectives``: the chosen metric values in order; ``items``: per-item
    scores of the chosen metrics (same keys), in the fixed fidelity order, or None where a metric has no per-item
    value; ``n_items``: how many items (documents) were scored in all; ``seconds``: wall time of the call;
    ``stderr``: standard error of each metric (same keys as ``metrics``) where the evaluator computed one (lm-eval's
    stderr, on the test split by default), else None.
    """

    metrics: dict[str, float]
    objective: float
    objectives: list[float]
    items: dict[str, list[float]] | None
    n_items: int
    seconds: float
    fidelity: float = 1.0
    stderr: dict[str, float] | None = None


@runtime_checkable
class Evaluator(Protocol):
    """Scores a live model; the same object is scored again and again while its weights change in place."""

    objective: Objective

    def score(self, model: Any, tokenizer: Any, *, fidelity: float = 1.0) -> EvalResult:
        """Evaluate ``model`` (put in eval mode, under inference mode, never copied) on a ``fidelity`` subset."""
        ...

    def check(self, model: Any = None) -> None:
        """Raise :class:`EvaluationError` for a configuration that cannot work, before any long work."""
        ...


def result_from_metrics(
    objective: Objective,
    metrics: dict[str, float],
    per_item: Mapping[str, Sequence[float]],
    *,
    n_items: int,
    seconds: float,
    fidelity: float,
    stderr: Mapping[str, float] | None = None,
) -> EvalResult:
    """Assemble an :class:`EvalResult`: objective values from ``metrics``, items of the objective's metrics."""
    values = objective.values(metrics)
    items = {m: [float(v) for v in per_item[m]] for m in objective.metrics if m in per_item}
    return EvalResult(
        metrics=metrics,
        objective=objective.combine(values),
        objectives=values,
        items=items or None,
        n_items=n_items,
        seconds=seconds,
        fidelity=fidelity,
        stderr=dict(stderr) if stderr else None,
    )


def check_fidelity(fidelity: float) -> float:
    """``fidelity`` as a float, or :class:`EvaluationError` unless ``0 < fidelity <= 1``."""
    if not (isinstance(fidelity, (int, float)) and 0.0 < float(fidelity) <= 1.0):
        raise EvaluationError(f"fidelity must be a number in (0, 1], got {fidelity!r}")
    return float(fidelity)


def fidelity_count(n: int, fidelity: float) -> int:
    """Number of items scored at ``fidelity``: ``max(1, ceil(fidelity * n))`` (monotone in fidelity, so nested)."""
    if n <= 0:
        raise EvaluationError("there are no items to evaluate")
    # round() first so that e.g. 0.29 * 100 = 28.999999999999996 counts as 29, not 30
    return max(1, math.ceil(round(check_fidelity(fidelity) * n, 9)))


def seeded_order(n: int, seed: int | None) -> list[int]:
    """A permutation of ``range(n)`` from ``random.Random(seed)``; the identity (file order) when seed is None."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and :func:`torch.inference_mode` for the duration; the previous train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
