"""``build_evaluator``: an evaluator from a plain config dict (as written in a search-space or CLI YAML).

``{"type": "lm_eval", "tasks": [...], "include_path": ..., "split": "validation", ...}``,
``{"type": "perplexity", "path": "heldout.jsonl", ...}`` or ``{"type": "callable", "function": "pkg.mod:fn"}``;
the other keys are the evaluator's constructor arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from evomerge.evaluate.base import EvaluationError, Evaluator
from evomerge.evaluate.function import CallableEvaluator
from evomerge.evaluate.lm_eval_evaluator import LmEvalEvaluator
from evomerge.evaluate.perplexity import PerplexityEvaluator

EVALUATORS: dict[str, type] = {
    "lm_eval": LmEvalEvaluator,
    "perplexity": PerplexityEvaluator,
    "callable": CallableEvaluator,
}


def build_evaluator(spec: Mapping[str, Any]) -> Evaluator:
    """The evaluator of ``spec["type"]`` built from the remaining keys; unknown or missing keys are named."""
    if not isinstance(spec, Mapping):
        raise EvaluationError(f"an evaluator spec is a mapping with a 'type' key, got {type(spec).__name__}")
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in EVALUATORS:
        raise EvaluationError(f"evaluator type must be one of {sorted(EVALUATORS)}, got {kind!r}")
    cls = EVALUATORS[kind]
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    unknown = sorted(set(kwargs) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs)
    if unknown or missing:
        raise EvaluationError(
            f"evaluator type {kind!r}: unknown keys {unknown}, missing keys {missing}; accepted keys: {sorted(params)}"
        )
    return cls(**kwargs)
