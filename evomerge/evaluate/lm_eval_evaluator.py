"""``LmEvalEvaluator``: lm-eval tasks scored on the live model, prepared once, re-run for every candidate.

Everything about a task that does not depend on the weights is done once, in ``__init__``: the task index
(``TaskManager(include_path, include_defaults=False)``; the slow built-in index only when a name is not found
there), the task objects and their datasets, the split choice, the fidelity order of the docs, and lm-eval's
own request building (prompt templates, few-shot contexts: ``Task.build_all_requests``). Each :meth:`score`
call then only clears the answers of the prepared requests, sends them through one
:class:`~evomerge.evaluate.fast_hflm.FastHFLM` that wraps the live model (created on the first call, reused
while the same model object is passed), and computes the metrics with the task's own ``process_results`` and
``aggregation`` — the steps of lm-eval's ``evaluator.evaluate`` for ungrouped tasks, without re-rendering
templates or re-tokenizing per call. There is no response cache (its key would not know the weights) and no
bootstrap stderr. Scores equal ``lm_eval.simple_evaluate`` on the same docs (tested); per-doc scores come
with every result (no ``log_samples`` switch needed).

Split: ``"validation"`` (for the search) or ``"test"`` (for the final report) — lm-eval evaluates a task's
``test_split`` when it has one, so for validation the task's ``test_split`` is pointed at its
``validation_split``. Fidelity: the docs are permuted once with ``random.Random(seed)``; ``limit`` caps the
permuted list and fidelity ``f`` scores its first ``ceil(f * n)`` docs (see :mod:`evomerge.evaluate.base`).
Metric keys are ``"<task>/<metric>"`` (``"<task>/<metric>,<filter>"`` for a filter other than lm-eval's
default ``none``). Groups named in ``tasks`` are expanded to their leaf tasks; group aggregates are not
computed (weight the leaf metrics in the objective instead).
"""

from __future__ import annotations

import difflib
import glob
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import Task
from lm_eval.defaults import DEFAULT_OTHER_SEED
from lm_eval.tasks import TaskManager

from evomerge.evaluate.base import (
    Direction,
    EvalResult,
    EvaluationError,
    Objective,
    check_fidelity,
    fidelity_count,
    result_from_metrics,
    scoring_mode,
    seeded_order,
)
from evomerge.evaluate.fast_hflm import FastHFLM

log = logging.getLogger(__name__)

Split = Literal["validation", "test"]
SPLITS: tuple[Split, ...] = ("validation", "test")
DEFAULT_FILTER = "none"


@dataclass
class _TaskPlan:
    """One task, prepared: its docs in fidelity order and lm-eval's requests for each of them."""

    task: Task
    doc_ids: list[int]  # index of each doc in its split, in fidelity order
    requests: list[list[Instance]]  # lm-eval's requests of each doc, in the same order


def _task_manager(tasks: Sequence[str], include_path: Sequence[Path], include_defaults: bool | None) -> TaskManager:
    """A TaskManager that knows every name in ``tasks``, or :class:`EvaluationError` listing the known ones.

    ``include_defaults=None`` indexes lm-eval's built-in tasks (slow: ~15k YAML files) only when a name is not
    found in ``include_path``; True always, False never.
    """
    for path in include_path:
        if not path.is_dir():
            raise EvaluationError(f"include_path {path} is not a directory; pass the folder holding the task YAMLs")
    paths = [str(p) for p in include_path] or None
    local = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in local.all_tasks]
    if include_defaults is False or (include_defaults is None and not missing):
        manager = local
    else:
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        searched = "the include path" if manager is local else "the include path and lm-eval's built-in tasks"
        close = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise EvaluationError(
            f"unknown lm-eval task(s) {unknown}, searched {searched}. Tasks in the include path {paths}: "
            f"{local.all_tasks}; close names: {close}. Fix the task names or the include_path"
            + (" (built-in tasks need include_defaults=None or True)." if include_defaults is False else ".")
        )
    return manager


def _data_files(cfg: Mapping[str, Any]) -> list[str]:
    """Every path named by ``dataset_kwargs.data_files`` (a string, a list, or a split -> str/list mapping)."""
    spec = (cfg.get("dataset_kwargs") or {}).get("data_files")
    values = list(spec.values()) if isinstance(spec, Mapping) else [spec]
    out: list[str] = []
    for v in values:
        out.extend([v] if isinstance(v, str) else list(v or []))
    return out


def _check_data_files(manager: TaskManager, tasks: Sequence[str]) -> None:
    """:class:`EvaluationError` naming the file and the YAML when a task's local data file does not exist."""
    for name in tasks:
        entry = manager.task_index[name]
        for file in _data_files(entry.cfg or {}):
            found = glob.glob(file) if glob.has_magic(file) else Path(file).exists()
            if not found:
                raise EvaluationError(
                    f"task {name!r} (YAML {entry.yaml_path}) reads data file {file!r}, which does not exist. "
                    "Rebuild the task files, or fix dataset_kwargs.data_files in the YAML (absolute paths; relative "
                    "ones are read from the current directory)."
                )


def _select_split(task: Task, split: Split) -> None:
    """Make lm-eval evaluate ``split``: it evaluates ``test_split`` when set, so point that at the wanted split."""
    cfg = task.config
    wanted = cfg.validation_split if split == "validation" else cfg.test_split
    if wanted is None:
        raise EvaluationError(
            f"task {task.task_name!r} has no {split} split (its YAML sets no {split}_split); "
            f"choose split={'test' if split == 'validation' else 'validation'!r} or add {split}_split to the YAML"
        )
    if wanted not in task.dataset:
        raise EvaluationError(
            f"task {task.task_name!r} sets {split}_split: {wanted!r}, but its data has only the splits "
            f"{list(task.dataset)}; fix {split}_split or dataset_kwargs.data_files in its YAML"
        )
    task.set_config(key="test_split", value=wanted)


class _PerDocCache:
    """``fn(doc)`` cached by the identity of the prepared docs (which the plan keeps alive, so ids stay unique).

    Calls with other docs or with extra arguments (an explicit template) go to ``fn`` unchanged.
    """

    def __init__(self, fn: Callable[..., Any], docs: Sequence[dict]) -> None:
        self.fn = fn
        self.known = {id(d) for d in docs}
        self.values: dict[int, Any] = {}

    def __call__(self, doc: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or id(doc) not in self.known:
            return self.fn(doc, *args, **kwargs)
        if id(doc) not in self.values:
            self.values[id(doc)] = self.fn(doc)
        return self.values[id(doc)]


def _memoize_doc_functions(task: Task, docs: Sequence[dict]) -> None:
    """Cache ``doc_to_text/target/choice`` of ``task`` for the prepared ``docs`` (pure functions of the doc).

    lm-eval renders a Jinja template (compiling it anew) on each call, and ``process_results`` calls these for
    every doc on every evaluation; with the cache, templates are rendered once per doc.
    """
    for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        setattr(task, name, _PerDocCache(getattr(task, name), docs))


def _metric_key(task: str, metric: str, filter_key: str) -> str:
    return f"{task}/{metric}" if filter_key == DEFAULT_FILTER else f"{task}/{metric},{filter_key}"


def _produced_metrics(tasks: Mapping[str, Task]) -> dict[str, bool]:
    """``{metric key: higher_is_better}`` for every metric x filter the tasks report."""
    out: dict[str, bool] = {}
    for name, task in tasks.items():
        filters = [f["name"] for f in task.config.filter_list or []] or [DEFAULT_FILTER]
        better = task.higher_is_better()
        for metric in task.aggregation():
            for f in filters:
                out[_metric_key(name, metric, f)] = bool(better.get(metric, True))
    return out


def _expand_metrics(metrics: Sequence[str] | None, tasks: Mapping[str, Task]) -> list[str]:
    """Metric keys from names: ``"acc"`` means ``"<task>/acc"`` for every task; None: each task's first metric."""
    if metrics is None:
        return [_metric_key(name, next(iter(task.aggregation())), DEFAULT_FILTER) for name, task in tasks.items()]
    out: list[str] = []
    for m in metrics:
        out.extend([m] if "/" in m else [_metric_key(name, m, DEFAULT_FILTER) for name in tasks])
    return out


class LmEvalEvaluator:
    """Scores lm-eval tasks on the live model (see the module doc for what is prepared once and what per call).

    Args:
        tasks: lm-eval task (or group) names, e.g. ``["zoo_add", "zoo_sort"]``.
        include_path: folders with task YAMLs (e.g. ``Zoo.task_dir``); lm-eval's built-in tasks are indexed
            only when a name is not found there.
        split: ``"validation"`` for the search, ``"test"`` for the final report.
        limit: at most this many docs per task (``< 1``: that fraction), taken from the seeded permutation.
        metrics: objective metrics, ``"acc"`` (every task) or ``"zoo_add/acc"``; default: each task's first metric.
        weights: objective weights, a list aligned with the expanded metric keys or a ``{key: weight}`` mapping.
        batch_size: requests per forward pass.
        seed: seed of the doc permutation that defines the fidelity subsets; None keeps the file order.
        max_length: model context length for lm-eval (default: from the model config).
        include_defaults: index lm-eval's built-in tasks: None = only if a name is not in ``include_path``
            (takes ~15 s), True = always, False = never.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_path: Sequence[Path | str] | Path | str | None = None,
        split: Split = "validation",
        limit: int | float | None = None,
        metrics: Sequence[str] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        batch_size: int = 32,
        seed: int | None = 0,
        max_length: int | None = None,
        include_defaults: bool | None = None,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise EvaluationError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        if split not in SPLITS:
            raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
        if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
            raise EvaluationError(f"limit must be a positive count or fraction, got {limit!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
        self.task_names = list(tasks)
        self.include_path = [Path(p) for p in paths]
        self.split: Split = split
        self.limit = limit
        self.batch_size = batch_size
        self.seed = seed
        self.max_length = max_length
        self.include_defaults = include_defaults
        self._requested_metrics = None if metrics is None else list(metrics)
        self._weights = weights
        self._lm: FastHFLM | None = None
        self._lm_owner: tuple[Any, Any] | None = None
        self._tasks: dict[str, Task] = {}
        self._plans: dict[str, _TaskPlan] = {}
        self.objective: Objective  # set by check(), from the built tasks
        self.check()
        self._plans = {name: self._prepare(task) for name, task in self._tasks.items()}

    # ---------------------------------------------------------------- configuration
    def check(self, model: Any = None) -> None:
        """Validate tasks, data files, split and metrics (building the task objects); with a model, its type.

        Raises :class:`EvaluationError` naming the problem: unknown task (lists the tasks in the include path),
        missing data file (names the file and the YAML), missing split, a metric the tasks do not produce (lists
        the produced ones), metrics that disagree on higher-is-better.
        """
        if not self._tasks:
            manager = _task_manager(self.task_names, self.include_path, self.include_defaults)
            _check_data_files(manager, self.task_names)
            try:
                loaded = manager.load(self.task_names)["tasks"]
            except Exception as err:  # lm-eval / datasets raise many types; name the tasks and keep the cause
                raise EvaluationError(
                    f"lm-eval could not build tasks {self.task_names}: {type(err).__name__}: {err}"
                ) from err
            for task in loaded.values():
                _select_split(task, self.split)
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
            self._tasks = dict(loaded)
            self.objective = self._build_objective()
        if model is not None and not (hasattr(model, "config") and callable(model)):
            raise EvaluationError(
                f"LmEvalEvaluator scores a transformers causal LM (with .config), got {type(model).__name__}"
            )

    def _build_objective(self) -> Objective:
        produced = _produced_metrics(self._tasks)
        keys = _expand_metrics(self._requested_metrics, self._tasks)
        missing = [k for k in keys if k not in produced]
        if missing:
            raise EvaluationError(
                f"metrics {missing} are not produced by the tasks; produced metrics: {sorted(produced)}"
            )
        directions: set[Direction] = {"maximize" if produced[k] else "minimize" for k in keys}
        if len(directions) > 1:
            raise EvaluationError(
                f"metrics {keys} mix higher-is-better and lower-is-better ones; choose metrics of one direction"
            )
        return Objective.build(keys, self._weights, directions.pop())

    def _prepare(self, task: Task) -> _TaskPlan:
        """Seeded doc order, ``limit``, and lm-eval's requests for the selected docs (built once)."""
        n_docs = len(task.eval_docs)
        order = seeded_order(n_docs, self.seed)
        if self.limit is not None:
            order = order[: int(math.ceil(n_docs * self.limit)) if self.limit < 1 else int(self.limit)]
        subset = sorted(order) if len(order) < n_docs else None
        task.build_all_requests(limit=None, samples=subset, cache_requests=False)
        by_doc: dict[int, list[Instance]] = defaultdict(list)
        for inst in task.instances:
            by_doc[inst.doc_id if subset is None else subset[inst.doc_id]].append(inst)
        requests = [sorted(by_doc[i], key=lambda inst: inst.idx) for i in order]
        _memoize_doc_functions(task, [reqs[0].doc for reqs in requests])
        return _TaskPlan(task=task, doc_ids=order, requests=requests)

    def doc_ids(self, fidelity: float = 1.0) -> dict[str, list[int]]:
        """Per task, the split indices of the docs scored at ``fidelity``, in per-item order."""
        return {name: plan.doc_ids[: fidelity_count(len(plan.doc_ids), fidelity)] for name, plan in self._plans.items()}

    def request_args(self, fidelity: float = 1.0) -> list[tuple[str, ...]]:
        """The arguments of every lm-eval request scored at ``fidelity`` (e.g. ``(context, continuation)``)."""
        n = {name: len(ids) for name, ids in self.doc_ids(fidelity).items()}
        return [inst.args for name, plan in self._plans.items() for reqs in plan.requests[: n[name]] for inst in reqs]

    # ---------------------------------------------------------------- scoring
    def _lm_for(self, model: Any, tokenizer: Any) -> FastHFLM:
        """The one HFLM wrapping ``model``; rebuilt only if a different model or tokenizer object is passed."""
        owner = self._lm_owner
        if self._lm is None or owner is None or owner[0] is not model or owner[1] is not tokenizer:
            self.check(model)
            # HFLM warns that a model object (not a name) was passed and that it assumes a single process: both
            # are this evaluator's design, not the user's mistake
            hf_log = logging.getLogger("lm_eval.models.huggingface")
            level = hf_log.level
            hf_log.setLevel(logging.ERROR)
            try:
                self._lm = FastHFLM(
                    pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_length=self.max_length
                )
            finally:
                hf_log.setLevel(level)
            self._lm_owner = (model, tokenizer)
        return self._lm

    def score(self, model: Any, tokenizer: Any, *, fidelity: float = 1.0) -> EvalResult:
        """Score the live ``model`` on the first ``ceil(fidelity * n)`` prepared docs of every task."""
        fidelity = check_fidelity(fidelity)
        start = time.perf_counter()
        lm = self._lm_for(model, tokenizer)
        scored = {
            name: plan.requests[: fidelity_count(len(plan.requests), fidelity)] for name, plan in self._plans.items()
        }
        by_type: dict[str, list[Instance]] = defaultdict(list)
        for per_doc in scored.values():
            for reqs in per_doc:
                for inst in reqs:
                    inst.resps, inst.filtered_resps = [], {}  # prepared requests are reused: drop old answers
                    by_type[inst.request_type].extend([inst] * inst.repeats)
        with scoring_mode(model):
            for request_type, reqs in by_type.items():
                for resp, inst in zip(getattr(lm, request_type)(reqs, disable_tqdm=True), reqs, strict=True):
                    inst.resps.append(resp)
        metrics: dict[str, float] = {}
        per_item: dict[str, list[float]] = {}
        for name, per_doc in scored.items():
            task_metrics, task_items = _task_metrics(name, self._plans[name].task, per_doc)
            metrics.update(task_metrics)
            per_item.update(task_items)
        return result_from_metrics(
            self.objective,
            metrics,
            per_item,
            n_items=sum(len(per_doc) for per_doc in scored.values()),
            seconds=time.perf_counter() - start,
            fidelity=fidelity,
        )


def _task_metrics(
    name: str, task: Task, per_doc: list[list[Instance]]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Aggregated metrics and per-doc values of one task, from answered requests (lm-eval's post-processing)."""
    flat = [inst for reqs in per_doc for inst in reqs]
    task._instances = flat  # lm-eval's filters act on the task's current instances
    task.apply_filters()
    aggregation = task.aggregation()
    metrics: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    for filter_key in flat[0].filtered_resps:
        raw: dict[str, list[Any]] = defaultdict(list)
        for reqs in per_doc:
            doc_metrics = task.process_results(reqs[0].doc, [inst.filtered_resps[filter_key] for inst in reqs])
            for metric, value in doc_metrics.items():
                raw[metric].append(value)
        for metric, values in raw.items():
            key = _metric_key(name, metric, filter_key)
            metrics[key] = float(aggregation.get(metric, mean)(values))
            if len(values) == len(per_doc) and all(isinstance(v, (int, float)) for v in values):
                items[key] = [float(v) for v in values]
    return metrics, items
