"""``CallableEvaluator``: a user function ``f(model, tokenizer) -> float | dict[str, float]`` as the score.

The function is given as a callable or as ``"package.module:function"``. A float result is reported as the
metric ``"score"``; a dict result as its keys. A function with a ``fidelity`` parameter also receives the
fidelity, otherwise fidelity is ignored (every call is a full evaluation).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evomerge.evaluate.base import (
    Direction,
    EvalResult,
    EvaluationError,
    Objective,
    check_fidelity,
    result_from_metrics,
    scoring_mode,
)

SCORE = "score"


def load_function(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """The callable named by ``"module:function"`` (or ``spec`` itself when callable); clear errors otherwise."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise EvaluationError(f"a callable evaluator needs a callable or 'package.module:function', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EvaluationError(
            f"cannot import module {module_name!r} of callable evaluator {spec!r}: {err}. "
            "Is it installed or on PYTHONPATH?"
        ) from err
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise EvaluationError(f"module {module_name!r} has no attribute {attr!r}; its callables: {public}")
    if not callable(fn):
        raise EvaluationError(f"{spec!r} is a {type(fn).__name__}, not a function")
    return fn


def _as_metrics(value: Any, name: str) -> dict[str, float]:
    """A float or a ``{str: float}`` result as a metrics dict; :class:`EvaluationError` for anything else."""
    def real(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))

    if real(value):
        return {SCORE: float(value)}
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and real(v) for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    raise EvaluationError(
        f"callable evaluator {name} must return a finite float or a non-empty dict of str -> finite float, "
        f"got {type(value).__name__}: {value!r:.200}"
    )


class CallableEvaluator:
    """Scores the live model with a user function (see the module doc).

    Args:
        function: the callable, or ``"package.module:function"``.
        metrics: which returned metrics form the objective (default: ``["score"]`` for a float result; for a
            dict result, all its keys, fixed at the first call).
        weights: objective weights (list aligned with ``metrics`` or a mapping).
        direction: ``"maximize"`` or ``"minimize"``.
    """

    def __init__(
        self,
        function: str | Callable[..., Any],
        *,
        metrics: Sequence[str] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        direction: Direction = "maximize",
    ) -> None:
        if metrics is None and weights is not None:
            raise EvaluationError("callable evaluator: weights need metrics= naming the weighted metrics")
        self.function = load_function(function)
        self.name = function if isinstance(function, str) else getattr(function, "__qualname__", repr(function))
        self._metrics = None if metrics is None else list(metrics)
        self._direction: Direction = direction
        self.objective = Objective.build(self._metrics or [SCORE], weights, direction)
        try:
            self._takes_fidelity = "fidelity" in inspect.signature(self.function).parameters
        except ValueError:  # builtins without a signature
            self._takes_fidelity = False
        self.check()

    def check(self, model: Any = None) -> None:
        """The function must accept ``(model, tokenizer)``, plus ``fidelity=`` if it has that parameter."""
        kwargs = {"fidelity": 1.0} if self._takes_fidelity else {}
        try:
            inspect.signature(self.function).bind(model, None, **kwargs)
        except TypeError as err:
            raise EvaluationError(f"callable evaluator {self.name} must accept (model, tokenizer): {err}") from err
        except ValueError:  # builtins without a signature: nothing to check
            pass

    def score(self, model: Any, tokenizer: Any, *, fidelity: float = 1.0) -> EvalResult:
        """Call the function on the live model (eval mode, inference mode) and wrap its result."""
        fidelity = check_fidelity(fidelity)
        start = time.perf_counter()
        kwargs = {"fidelity": fidelity} if self._takes_fidelity else {}
        with scoring_mode(model):
            metrics = _as_metrics(self.function(model, tokenizer, **kwargs), self.name)
        if self._metrics is None and SCORE not in metrics:
            self._metrics = list(metrics)
            self.objective = Objective(tuple(self._metrics), direction=self._direction)
        return result_from_metrics(
            self.objective, metrics, {}, n_items=1, seconds=time.perf_counter() - start, fidelity=fidelity
        )
