"""``LmEvalEvaluator``: lm-eval tasks scored on the live model, prepared once, re-run for every candidate.

Everything about a task that does not depend on the weights is done once, in ``__init__``: the task index
(``TaskManager(include_path, include_defaults=False)``; the slow built-in index only when a name is not found
there), the task objects and their datasets, the split choice, the fidelity order of the docs, and lm-eval's
own request building (prompt templates, few-shot contexts: ``Task.build_all_requests``). Each :meth:`score`
call then only clears the answers of the prepared requests, sends them through one
:class:`~evomerge.evaluate.fast_hflm.FastHFLM` that wraps the live model (created on the first call, reused
while the same model object is passed), and computes the metrics with the task's own filters and
``process_results`` and lm-eval's aggregation (``_process_results``: task aggregates, stderr, group aggregates) —
the steps of lm-eval's ``evaluator.evaluate``, without re-rendering templates or re-tokenizing per call. There is
no response cache (its key would not know the weights). Scores equal ``lm_eval.simple_evaluate`` and lm-eval's CLI
on the same docs (tested); per-doc scores come with every result (no ``log_samples`` switch needed).

Split: ``"validation"`` (for the search) or ``"test"`` (for the final report) — lm-eval evaluates a task's
``test_split`` when it has one, so for validation the task's ``test_split`` is pointed at its
``validation_split``. Fidelity: the docs are permuted once with ``random.Random(seed)`` and fidelity ``f`` scores
the first ``ceil(f * n)`` docs of that order (see :mod:`evomerge.evaluate.base`). ``limit`` caps the docs:
``limit_mode="seeded"`` takes them from the seeded permutation (a random subset), ``"first"`` takes the first
``limit`` docs of the split as lm-eval's ``--limit`` does (then permuted for the fidelity order), so lm-eval's CLI
with ``--limit`` reproduces the score.

The other lm-eval settings (``num_fewshot``, ``apply_chat_template``, ``fewshot_as_multiturn``,
``system_instruction``, ``gen_kwargs``, ``batch_size``, ``bootstrap_iters``) act as the same options of
lm-eval's CLI / ``simple_evaluate``: the requests are built by the task's own ``build_all_requests`` with them.

Seeds: ``simple_evaluate`` seeds Python's ``random`` (``random_seed``, default 0), NumPy (``numpy_random_seed``,
1234) and torch (``torch_random_seed``, 1234: ``torch.manual_seed``, CUDA included) once before it runs the
requests, and every task's few-shot sampler (``fewshot_random_seed``, 1234). Here the few-shot sampler is seeded
when the requests are built, and the three generators are seeded the same way at the start of every
:meth:`LmEvalEvaluator.score` (every trial), so a generation task that samples (``gen_kwargs: do_sample=true``)
draws what lm-eval's CLI with the same seeds draws on the same docs, in every trial alike; the generators' states
are restored afterwards (a search's own random streams are not moved). None leaves that generator as it is.

Metrics: lm-eval reports ``"<metric>,<filter>"`` per task (``"<metric>,none"`` for a task without filters).
Here the keys are ``"<task>/<metric>"`` for filter ``none`` and ``"<task>/<metric>,<filter>"`` otherwise; a
requested metric without a filter means the task's own filter(s) (``exact_match`` of a task with a
``strict-match`` filter is ``exact_match,strict-match``). Groups named in ``tasks`` are evaluated through their
leaf tasks, and a group with an ``aggregate_metric_list`` reports its aggregate (``"<group>/<metric>"``) as
lm-eval computes it (size-weighted or not, as the group's YAML says), from the same code (lm-eval's
``_process_results``). Stderr (``EvalResult.stderr``) is lm-eval's: closed form for mean metrics, bootstrap with
``bootstrap_iters`` draws for the others; ``bootstrap_iters`` defaults to 0 (no stderr, search-time scoring) on
the validation split and to lm-eval's 100000 on the test split (the final report).
"""

from __future__ import annotations

import difflib
import glob
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lm_eval.api.group import Group
from lm_eval.api.instance import Instance
from lm_eval.api.task import Task
from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
from lm_eval.evaluator_utils import _process_results, get_sample_size
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string

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
LimitMode = Literal["seeded", "first"]
LIMIT_MODES: tuple[LimitMode, ...] = ("seeded", "first")
DEFAULT_FILTER = "none"
TEST_BOOTSTRAP_ITERS = 100000  # lm-eval's default (CLI and simple_evaluate)


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
    every doc on every evaluation; with the cache, templates are rendered once per doc. A task prepared again
    (chat template of another tokenizer) gets a cache of its new docs around the original functions.
    """
    for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        fn = getattr(task, name)
        setattr(task, name, _PerDocCache(fn.fn if isinstance(fn, _PerDocCache) else fn, docs))


def _configure_task(task: Task, num_fewshot: int | None, gen_kwargs: dict[str, Any] | None) -> None:
    """``simple_evaluate``'s per-task overrides: ``gen_kwargs`` update a generation task's ``generation_kwargs``;
    ``num_fewshot`` replaces the task's default unless its YAML fixes 0 shots; no default means 0 shots."""
    if gen_kwargs is not None and task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
    if num_fewshot is not None:
        if task.get_config("num_fewshot") == 0:
            log.info("task %s fixes num_fewshot: 0 in its YAML; num_fewshot=%s is ignored (as lm-eval does)",
                     task.task_name, num_fewshot)
        else:
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)


def _metric_key(task: str, metric: str, filter_key: str) -> str:
    return f"{task}/{metric}" if filter_key == DEFAULT_FILTER else f"{task}/{metric},{filter_key}"


Pairs = dict[tuple[str, str], bool]  # (metric, filter) -> higher is better, in lm-eval's reporting order


def _task_pairs(task: Task) -> Pairs:
    """Every ``(metric, filter)`` a task reports (a task without filters has lm-eval's ``none`` filter)."""
    filters = [f["name"] for f in task.config.filter_list or []] or [DEFAULT_FILTER]
    better = task.higher_is_better()
    return {(metric, f): bool(better.get(metric, True)) for f in filters for metric in task.aggregation()}


def _group_pairs(group: Group, leaves: Mapping[str, Pairs]) -> Pairs:
    """The ``(metric, filter)`` aggregates of a group: its ``aggregate_metric_list``, filters as listed there or, when
    not listed, every filter its leaf tasks report the metric with (lm-eval's ``Group.aggregate``)."""
    leaf_pairs = [leaves[t.task_name] for t in group.get_all_tasks() if t.task_name in leaves]
    out: Pairs = {}
    for agg in group.aggregate_metric_list or []:
        found = sorted({f for pairs in leaf_pairs for m, f in pairs if m == agg.metric})
        for f in agg.filter_list if agg.filter_list is not None else found:
            better = [pairs[(agg.metric, f)] for pairs in leaf_pairs if (agg.metric, f) in pairs]
            if better:
                out[(agg.metric, f)] = better[0]
    return out


def _reported(tasks: Mapping[str, Task], groups: Mapping[str, Group]) -> dict[str, Pairs]:
    """``{task or aggregating group: its (metric, filter) pairs}`` for everything lm-eval reports a score of."""
    out = {name: _task_pairs(task) for name, task in tasks.items()}
    for name, group in groups.items():
        if group.has_aggregation:
            out[name] = _group_pairs(group, out)
    return out


def _scored_units(names: Sequence[str], tasks: Mapping[str, Task], groups: Mapping[str, Group]) -> list[str]:
    """What a metric without a task means: each requested task, each requested group that aggregates, and the
    leaf tasks of the other requested names (groups without an aggregate, tags)."""
    units: list[str] = []
    covered: set[str] = set()
    for name in names:
        group = groups.get(name)
        if name in tasks:
            units.append(name)
            covered.add(name)
        elif group is not None and group.has_aggregation:
            units.append(name)
            covered.update(t.task_name for t in group.get_all_tasks())
    return units + [name for name in tasks if name not in covered]


def _pair_text(pairs: Pairs) -> str:
    return ", ".join(f"{m},{f}" for m, f in pairs)


def _resolve_metric(spec: str, units: Sequence[str], reported: Mapping[str, Pairs]) -> list[str]:
    """Metric keys of one requested metric: ``"acc"`` (every unit), ``"task/acc"`` or ``"task/acc,filter"``.

    A metric without a filter means filter ``none`` when the task reports it, else every filter the task reports
    the metric with (lm-eval's ``metric,filter`` results keys). :class:`EvaluationError` lists the task's pairs.
    """
    target, _, metric = spec.rpartition("/")
    if target and target not in reported:
        raise EvaluationError(
            f"metric {spec!r} names {target!r}, which is not an evaluated task or aggregating group; "
            f"evaluated: {sorted(reported)}"
        )
    metric, _, filter_key = metric.partition(",")
    out: list[str] = []
    for unit in [target] if target else units:
        pairs = reported[unit]
        if filter_key:
            chosen = [(metric, filter_key)] if (metric, filter_key) in pairs else []
        elif (metric, DEFAULT_FILTER) in pairs:
            chosen = [(metric, DEFAULT_FILTER)]
        else:
            chosen = [(m, f) for m, f in pairs if m == metric]
        if not chosen:
            raise EvaluationError(
                f"metric {spec!r} is not produced by {unit!r}; its metric,filter pairs (lm-eval's results keys): "
                f"{_pair_text(pairs)}. Name one of them (e.g. {unit}/{next(iter(pairs))[0]})"
            )
        out.extend(_metric_key(unit, m, f) for m, f in chosen)
    return out


class LmEvalEvaluator:
    """Scores lm-eval tasks on the live model (see the module doc for what is prepared once and what per call).

    Args:
        tasks: lm-eval task or group names, e.g. ``["zoo_add", "zoo_sort"]``.
        include_path: folders with task YAMLs (e.g. ``Zoo.task_dir``); lm-eval's built-in tasks are indexed
            only when a name is not found there.
        split: ``"validation"`` for the search, ``"test"`` for the final report.
        limit: at most this many docs per task (``< 1``: that fraction, rounded up, as lm-eval's ``--limit``).
        limit_mode: ``"seeded"``: the ``limit`` docs are the first of the seeded permutation (a random subset);
            ``"first"``: the first ``limit`` docs of the split, as lm-eval's ``--limit``.
        metrics: objective metrics, ``"acc"`` (every task), ``"zoo_add/acc"``, ``"gsm8k/exact_match,strict-match"``;
            without a filter, the task's own filter(s); default: each task's first metric and filter.
        weights: objective weights, a list aligned with the expanded metric keys or a ``{key: weight}`` mapping
            (a key without a filter weights each of its filters).
        batch_size: requests per forward pass (lm-eval's ``--batch_size``; ``"auto"`` lets lm-eval choose).
        seed: seed of the doc permutation that defines the fidelity subsets; None keeps the file order.
        max_length: model context length for lm-eval (default: from the model config).
        include_defaults: index lm-eval's built-in tasks: None = only if a name is not in ``include_path``
            (takes ~15 s), True = always, False = never.
        num_fewshot: few-shot examples per prompt (lm-eval's ``--num_fewshot``: replaces each task's default,
            except where its YAML fixes 0); default: the task's own, else 0.
        apply_chat_template: render prompts with the tokenizer's chat template (``--apply_chat_template``).
        fewshot_as_multiturn: few-shot examples as chat turns (``--fewshot_as_multiturn``); default: on with a chat
            template; needs ``apply_chat_template``.
        system_instruction: text put before every prompt, as a system turn with a chat template
            (``--system_instruction``).
        gen_kwargs: generation settings of ``generate_until`` tasks, a dict or ``"max_gen_toks=32,until=..."``
            (``--gen_kwargs``), merged into each task's ``generation_kwargs``.
        bootstrap_iters: lm-eval's ``--bootstrap_iters`` for the stderr in :attr:`EvalResult.stderr`; default 0 on
            the validation split (search-time scoring), 100000 on the test split (the final report).
        random_seed, numpy_random_seed, torch_random_seed, fewshot_random_seed: lm-eval's ``--seed`` parts
            (``simple_evaluate``'s arguments, its defaults 0 / 1234 / 1234 / 1234), applied per :meth:`score` call
            (module doc); None leaves that generator unseeded.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_path: Sequence[Path | str] | Path | str | None = None,
        split: Split = "validation",
        limit: int | float | None = None,
        limit_mode: LimitMode = "seeded",
        metrics: Sequence[str] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        batch_size: int | str = 32,
        seed: int | None = 0,
        max_length: int | None = None,
        include_defaults: bool | None = None,
        num_fewshot: int | None = None,
        apply_chat_template: bool | str = False,
        fewshot_as_multiturn: bool | None = None,
        system_instruction: str | None = None,
        gen_kwargs: Mapping[str, Any] | str | None = None,
        bootstrap_iters: int | None = None,
        random_seed: int | None = DEFAULT_RANDOM_SEED,
        numpy_random_seed: int | None = DEFAULT_OTHER_SEED,
        torch_random_seed: int | None = DEFAULT_OTHER_SEED,
        fewshot_random_seed: int | None = DEFAULT_OTHER_SEED,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise EvaluationError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        if split not in SPLITS:
            raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
        if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
            raise EvaluationError(f"limit must be a positive count or fraction, got {limit!r}")
        if limit_mode not in LIMIT_MODES:
            raise EvaluationError(f"limit_mode must be one of {LIMIT_MODES}, got {limit_mode!r}")
        if not ((isinstance(batch_size, int) and batch_size >= 1) or str(batch_size).startswith("auto")):
            raise EvaluationError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        if num_fewshot is not None and not (isinstance(num_fewshot, int) and num_fewshot >= 0):
            raise EvaluationError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
        if fewshot_as_multiturn and not apply_chat_template:
            raise EvaluationError("fewshot_as_multiturn needs apply_chat_template (as in lm-eval); set both or neither")
        if bootstrap_iters is not None and not (isinstance(bootstrap_iters, int) and bootstrap_iters >= 0):
            raise EvaluationError(f"bootstrap_iters must be a non-negative integer, got {bootstrap_iters!r}")
        seeds = {"random_seed": random_seed, "numpy_random_seed": numpy_random_seed,
                 "torch_random_seed": torch_random_seed, "fewshot_random_seed": fewshot_random_seed}
        for key, value in seeds.items():
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise EvaluationError(f"{key} must be a non-negative integer or null, got {value!r}")
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
        self.task_names = list(tasks)
        self.include_path = [Path(p) for p in paths]
        self.split: Split = split
        self.limit = limit
        self.limit_mode: LimitMode = limit_mode
        self.batch_size = batch_size
        self.seed = seed
        self.max_length = max_length
        self.include_defaults = include_defaults
        self.num_fewshot = num_fewshot
        self.apply_chat_template = apply_chat_template
        self.fewshot_as_multiturn = bool(apply_chat_template) if fewshot_as_multiturn is None else fewshot_as_multiturn
        self.system_instruction = system_instruction
        self.gen_kwargs = simple_parse_args_string(gen_kwargs) if isinstance(gen_kwargs, str) else gen_kwargs
        default_iters = TEST_BOOTSTRAP_ITERS if split == "test" else 0
        self.bootstrap_iters = default_iters if bootstrap_iters is None else bootstrap_iters
        self.random_seed, self.numpy_random_seed = random_seed, numpy_random_seed
        self.torch_random_seed, self.fewshot_random_seed = torch_random_seed, fewshot_random_seed
        self._requested_metrics = None if metrics is None else list(metrics)
        self._weights = weights
        self._lm: FastHFLM | None = None
        self._lm_owner: tuple[Any, Any] | None = None
        self._tasks: dict[str, Task] = {}
        self._groups: dict[str, Group] = {}
        self._plans: dict[str, _TaskPlan] = {}
        self.objective: Objective  # set by check(), from the built tasks
        self.check()
        if not self.apply_chat_template:  # chat prompts need the tokenizer: prepared on the first score()
            self._plans = {name: self._prepare(task, None) for name, task in self._tasks.items()}

    # ---------------------------------------------------------------- configuration
    def check(self, model: Any = None) -> None:
        """Validate tasks, data files, split and metrics (building the task objects); with a model, its type.

        Raises :class:`EvaluationError` naming the problem: unknown task (lists the tasks in the include path),
        missing data file (names the file and the YAML), missing split, a metric the tasks do not produce (lists
        the produced ``metric,filter`` pairs), metrics that disagree on higher-is-better.
        """
        if not self._tasks:
            manager = _task_manager(self.task_names, self.include_path, self.include_defaults)
            _check_data_files(manager, self.task_names)
            try:
                loaded = manager.load(self.task_names)
            except Exception as err:  # lm-eval / datasets raise many types; name the tasks and keep the cause
                raise EvaluationError(
                    f"lm-eval could not build tasks {self.task_names}: {type(err).__name__}: {err}"
                ) from err
            for task in loaded["tasks"].values():
                _select_split(task, self.split)
                _configure_task(task, self.num_fewshot, self.gen_kwargs)
            self._tasks = dict(loaded["tasks"])
            self._groups = dict(loaded.get("groups") or {})
            self.objective = self._build_objective()
        if model is not None and not (hasattr(model, "config") and callable(model)):
            raise EvaluationError(
                f"LmEvalEvaluator scores a transformers causal LM (with .config), got {type(model).__name__}"
            )

    def _build_objective(self) -> Objective:
        reported = _reported(self._tasks, self._groups)
        units = _scored_units(self.task_names, self._tasks, self._groups)
        if self._requested_metrics is None:
            keys = [_metric_key(unit, *next(iter(reported[unit]))) for unit in units]
        else:
            keys = list(dict.fromkeys(k for m in self._requested_metrics for k in _resolve_metric(m, units, reported)))
        better = {_metric_key(name, m, f): b for name, pairs in reported.items() for (m, f), b in pairs.items()}
        directions: set[Direction] = {"maximize" if better[k] else "minimize" for k in keys}
        if len(directions) > 1:
            raise EvaluationError(
                f"metrics {keys} mix higher-is-better and lower-is-better ones; choose metrics of one direction"
            )
        weights = self._weights
        if isinstance(weights, Mapping):  # a key without a filter (or task) weights every metric it stands for
            weights = {k: w for spec, w in weights.items() for k in _resolve_metric(spec, units, reported)}
        return Objective.build(keys, weights, directions.pop())

    def _prepare(self, task: Task, lm: FastHFLM | None) -> _TaskPlan:
        """Doc order, ``limit``, and lm-eval's requests for the selected docs (built once; with a chat template,
        once per tokenizer, whose template renders the prompts)."""
        n_docs = len(task.eval_docs)
        if self.limit is None:
            order = seeded_order(n_docs, self.seed)
        elif self.limit_mode == "first":  # lm-eval's --limit: the first docs of the split
            order = seeded_order(min(n_docs, get_sample_size(task, self.limit)), self.seed)
        else:
            order = seeded_order(n_docs, self.seed)[: get_sample_size(task, self.limit)]
        subset = sorted(order) if len(order) < n_docs else None
        if self.fewshot_random_seed is not None:  # a fresh few-shot sampler: lm-eval's draws for these docs
            task.set_fewshot_seed(seed=self.fewshot_random_seed)
        chat = bool(self.apply_chat_template)
        task.build_all_requests(
            limit=None,
            samples=subset,
            cache_requests=False,
            system_instruction=self.system_instruction,
            apply_chat_template=chat,
            fewshot_as_multiturn=self.fewshot_as_multiturn,
            chat_template=lm.apply_chat_template if chat and lm is not None else None,
            tokenizer_name=lm.tokenizer_name if chat and lm is not None else "",
        )
        by_doc: dict[int, list[Instance]] = defaultdict(list)
        for inst in task.instances:
            by_doc[inst.doc_id if subset is None else subset[inst.doc_id]].append(inst)
        requests = [sorted(by_doc[i], key=lambda inst: inst.idx) for i in order]
        _memoize_doc_functions(task, [reqs[0].doc for reqs in requests])
        return _TaskPlan(task=task, doc_ids=order, requests=requests)

    def _prepared(self) -> dict[str, _TaskPlan]:
        if not self._plans:
            raise EvaluationError("with apply_chat_template the requests are built on the first score() call")
        return self._plans

    def doc_ids(self, fidelity: float = 1.0) -> dict[str, list[int]]:
        """Per task, the split indices of the docs scored at ``fidelity``, in per-item order."""
        plans = self._prepared()
        return {name: plan.doc_ids[: fidelity_count(len(plan.doc_ids), fidelity)] for name, plan in plans.items()}

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
            if self.apply_chat_template and (owner is None or owner[1] is not tokenizer):
                self._plans = {name: self._prepare(task, self._lm) for name, task in self._tasks.items()}
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
        with scoring_mode(model), lm_eval_seeds(self.random_seed, self.numpy_random_seed, self.torch_random_seed):
            for request_type, reqs in by_type.items():
                for resp, inst in zip(getattr(lm, request_type)(reqs, disable_tqdm=True), reqs, strict=True):
                    inst.resps.append(resp)
        accumulated: dict[str, Any] = {}
        per_item: dict[str, list[float]] = {}
        for name, per_doc in scored.items():
            raw = _raw_metrics(self._plans[name].task, per_doc)
            accumulated[name] = {"task": self._plans[name].task, "raw_metrics": raw, "logged_samples": []}
            for (metric, filter_key), values in raw.items():
                if len(values) == len(per_doc) and all(isinstance(v, (int, float)) for v in values):
                    per_item[_metric_key(name, metric, filter_key)] = [float(v) for v in values]
        # lm-eval's own aggregation, stderr and group aggregates (evaluator.evaluate's last step)
        results = _process_results(accumulated, self._groups, self.bootstrap_iters)
        metrics, stderr = _flatten(results.metrics)
        return result_from_metrics(
            self.objective,
            metrics,
            per_item,
            n_items=sum(len(per_doc) for per_doc in scored.values()),
            seconds=time.perf_counter() - start,
            fidelity=fidelity,
            stderr=stderr,
        )


@contextmanager
def lm_eval_seeds(random_seed: int | None, numpy_seed: int | None, torch_seed: int | None) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's global generator and torch's (``torch.manual_seed``: CPU and every CUDA
    device) as ``lm_eval.simple_evaluate`` does before it runs the requests (None: that one left alone); their
    previous states are restored on exit."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if random_seed is not None:
            random.seed(random_seed)
        if numpy_seed is not None:
            np.random.seed(numpy_seed)
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def _raw_metrics(task: Task, per_doc: list[list[Instance]]) -> dict[tuple[str, str], list[Any]]:
    """``{(metric, filter): per-doc values}`` of one task from answered requests (lm-eval's post-processing)."""
    flat = [inst for reqs in per_doc for inst in reqs]
    task._instances = flat  # lm-eval's filters act on the task's current instances
    task.apply_filters()
    raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for filter_key in flat[0].filtered_resps:
        for reqs in per_doc:
            doc_metrics = task.process_results(reqs[0].doc, [inst.filtered_resps[filter_key] for inst in reqs])
            for metric, value in doc_metrics.items():
                raw[(metric, filter_key)].append(value)
    return raw


def _flatten(reported: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's ``{task: {"metric,filter": value, "metric_stderr,filter": stderr | "N/A"}}`` as our metric keys:
    the values, and the stderrs that lm-eval computed."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for name, entry in reported.items():
        for key, value in entry.items():
            metric, comma, filter_key = key.partition(",")
            if not comma:
                continue  # alias, sample_len, ...
            if metric.endswith("_stderr"):
                if isinstance(value, (int, float)):
                    stderr[_metric_key(name, metric.removesuffix("_stderr"), filter_key)] = float(value)
            else:
                metrics[_metric_key(name, metric, filter_key)] = float(value)
    return metrics, stderr
