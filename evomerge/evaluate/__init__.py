"""Evaluation harness: scores the live model that the merge engine writes into.

Evaluators (:class:`Evaluator` protocol): :class:`LmEvalEvaluator` (lm-eval tasks, local YAML + JSONL or
built-in), :class:`PerplexityEvaluator` (sliding-window perplexity / bits per byte on local text) and
:class:`CallableEvaluator` (a user function); :func:`build_evaluator` makes one from a config dict.
"""

from evomerge.evaluate.base import EvalResult, EvaluationError, Evaluator, Objective
from evomerge.evaluate.factory import EVALUATORS, build_evaluator
from evomerge.evaluate.function import CallableEvaluator
from evomerge.evaluate.lm_eval_evaluator import LmEvalEvaluator
from evomerge.evaluate.local_tasks import write_multiple_choice_task
from evomerge.evaluate.perplexity import PerplexityEvaluator

__all__ = [
    "EVALUATORS",
    "CallableEvaluator",
    "EvalResult",
    "EvaluationError",
    "Evaluator",
    "LmEvalEvaluator",
    "Objective",
    "PerplexityEvaluator",
    "build_evaluator",
    "write_multiple_choice_task",
]
