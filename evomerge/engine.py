"""MergeEngine: materializes recipes in place, into the parameters of one live ``transformers`` model.

The engine reads every model of the search once (base and sources), keeps their tensors resident on the compute
device (or in pinned CPU memory when they exceed a memory budget, streamed per tensor), and for each candidate
recipe writes the merged tensors straight into the live model: no disk, no new model object per candidate.
Only tensors whose resolved parameters changed since the previous candidate are merged again.

Arithmetic is fp32; results are stored in the live model's dtype. Stochastic methods (DARE, DELLA) draw from the
counter-based generator of :mod:`evomerge.methods.counter_rng` keyed per tensor by ``(recipe.seed, tensor name)``,
so the same recipe gives the same masks on CPU and CUDA, whatever order the tensors are merged in.

Hot path (numbers in results/merge_throughput_*.md): the tensors of every model live in one flat buffer per model
(each tensor at a 64-entry aligned offset), and the live model's merged tensors are rebound to views of one flat
buffer in the same layout, so a run of consecutive tensors with the same parameters is one slice. Methods flagged
``elementwise`` in the registry are merged per such run (linear, task arithmetic) or per tensor with their
per-tensor inputs computed once for the whole tensor and kept across candidates when they depend on the models
only (TIES / breadcrumbs thresholds and sorted magnitudes, DELLA's magnitude ranks, the Gram matrices of the
angle-based methods). DARE's uniform draws are counter-based (a hash of seed, tensor and position): kept per seed
in a noise store when it fits in memory (a new seed refills it at hash speed), else computed inside the merge
kernel. The merge itself -- upcast, the method's formula, cast into the live tensor -- is one
``torch.compile`` kernel (CPU and CUDA, for models of 16M+ entries; compiled with eager numerics, so the result
is bit-identical to the plain formula), or eagerly: on CPU in cache-sized chunks of entries (bit-identical too:
the formula is entrywise). Non-finite results are detected on the stored entries (min and max per run) with one
device synchronisation per candidate.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from evomerge.checkpoint import Checkpoint, check_compatible, save_hf_dir
from evomerge.methods import MergeMethod, get_method, validate_params
from evomerge.methods.counter_rng import row_keys, uniform
from evomerge.methods.select import SortedMagnitudes
from evomerge.methods.sparsify import kth_magnitudes, relative_ranks
from evomerge.recipe import Recipe, RecipeError, resolve_params

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ALIGN = 64  # entries: every tensor starts at a multiple of this in the flat buffers (vector loads stay aligned)
_CPU_CHUNK = 1 << 18  # entries merged at a time on CPU: the fp32 temporaries of one chunk stay in the caches
_CACHE_ENTRIES = 1 << 16  # bound of the threshold and device-parameter caches (entries; each a few bytes)
# torch.compile takes seconds per method; below this many entries the eager merge is faster than that
_COMPILE_MIN_ENTRIES = 1 << 24
_NOISE_CACHE_SHARE = 0.25  # share of the memory free after loading that stored DARE draws may take
# ... and that per-entry facts of the task vectors may take: sorted magnitudes (CPU thresholds for any density),
# relative magnitude ranks (DELLA)
_TASK_CACHE_SHARE = 0.25


class MergeError(RuntimeError):
    """A merge that produced an unusable result (e.g. NaN/Inf); the message names the tensor."""


@dataclass
class MergeStats:
    """What one :meth:`MergeEngine.materialize` call did."""

    merged: int = 0
    skipped: int = 0
    seconds: float = 0.0
    bytes_moved: int = 0
    names: list[str] = field(default_factory=list)


def keep_cpu_heap() -> bool:
    """Ask glibc to serve large allocations from its heap and keep freed memory (``mallopt``).

    By default glibc maps each allocation above 32 MiB fresh from the kernel and unmaps it on free, so every merge
    of a large tensor pays page faults and page zeroing for its fp32 temporaries (which then cost more than the
    arithmetic). With mmap off and a high trim threshold, the temporaries of one candidate reuse the pages of
    the previous one. Process-wide; a no-op (returns False) off glibc or with ``EVOMERGE_KEEP_MALLOC=1``.
    """
    if os.environ.get("EVOMERGE_KEEP_MALLOC") == "1" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))


def all_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf: one float64 reduction (NaN/Inf propagate; fp32 values cannot overflow it)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the recipe seed and the tensor name (stable across runs and processes)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def compute_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available, else CPU); RecipeError naming the problem when this
    machine cannot compute on it (an unknown device string, CUDA not available, a CUDA index past the last GPU)."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # torch lists every device type it knows, most irrelevant here
        raise RecipeError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise RecipeError(f"device {str(resolved)!r} requested but CUDA is not available ({build}, torch "
                              f"{torch.__version__}); use --device cpu, or leave the device unset to use a GPU when "
                              "there is one")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RecipeError(f"device {str(resolved)!r} requested but this machine has {torch.cuda.device_count()} "
                              "GPU(s)")
    elif resolved.type != "cpu":
        raise RecipeError(f"device {str(resolved)!r} is not supported by the merge engine; use 'cpu' or 'cuda'")
    return resolved


def model_class(config: object, names: Sequence[str]) -> type:
    """A causal LM when the config's architectures say so (or, without architectures, when there is an lm_head)."""
    from transformers import AutoModel, AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") for a in archs) if archs else "lm_head.weight" in names
    return AutoModelForCausalLM if causal else AutoModel


def load_model(path: str | Path, *, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Load an HF dir as a live model (causal LM when the config says so), on ``device`` in ``dtype``, eval mode."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with Checkpoint.open(path) as ck:
        cls = model_class(config, ck.names)
    model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    return model.to(device).eval()


def _rows(stack: Tensor, idx: list[int]) -> Tensor:
    """``stack[idx]``, as a view (no copy) when ``idx`` is a contiguous ascending run."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return stack[idx[0] : idx[0] + len(idx)]
    return stack[idx]


@dataclass(frozen=True)
class _Span:
    """Where a tensor lives in the flat buffers: entries ``[offset, offset + numel)``."""

    offset: int
    numel: int
    shape: torch.Size


@dataclass
class _Inputs:
    """What a merge kernel reads besides base and sources, by how it is sliced into chunks of entries.

    ``entries``: keyword arguments with one value per entry ([N, entries], e.g. stored DARE draws); ``blocks``: one
    value per block of ``_ALIGN`` entries ([N, blocks] tables, e.g. the thresholds of every tensor of a run), given
    to ``fn`` expanded per entry (:func:`_per_entry`); ``keys``: a stochastic method's
    :func:`~evomerge.methods.counter_rng.row_keys` [N, 2] when its draws are not stored: ``fn`` gets ``noise``
    computed in the kernel for entries ``start ..`` of the tensor.
    """

    entries: dict[str, Tensor] = field(default_factory=dict)
    blocks: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    keys: Tensor | None = None
    start: int = 0

    def chunk(self, begin: int, end: int) -> _Inputs:
        """The inputs of entries ``[begin, end)`` (``begin`` a multiple of ``_ALIGN``)."""
        return _Inputs(
            {key: t[:, begin:end] for key, t in self.entries.items()},
            {key: tuple(t[:, begin // _ALIGN : -(-end // _ALIGN)] for t in tables)
             for key, tables in self.blocks.items()},
            self.keys, self.start + begin)


def _fused_merge(
    fn: Callable[..., Tensor], out: Tensor, rows: Tensor, base_row: Tensor | None, kwargs: Mapping[str, object],
    inputs: _Inputs,
) -> None:
    """``out ← fn(base, sources)`` with the upcast to fp32 and the cast into ``out`` in the same graph (compiled,
    one kernel for entrywise methods)."""
    size = rows.shape[1]
    extra: dict[str, object] = dict(inputs.entries)
    extra.update({key: tuple(_per_entry(table, size) for table in tables) for key, tables in inputs.blocks.items()})
    if inputs.keys is not None:
        extra["noise"] = _draws(inputs.keys, inputs.start, size, rows.device)
    merged = fn(None if base_row is None else base_row.float(), rows.float(), **kwargs, **extra)
    out.copy_(merged)


def _draws(keys: Tensor, start: int, size: int, device: torch.device) -> Tensor:
    """The counter-based draws [N, size] of entries ``start .. start + size`` of a tensor with ``keys``."""
    return uniform(keys, torch.arange(size, device=device) + start)


def _draw_into(out: Tensor, keys: Tensor, start: int = 0) -> None:
    """``out`` [N, M] ← :func:`_draws` of entries ``start .. start + M``."""
    out.copy_(_draws(keys, start, out.shape[1], out.device))


def _per_entry(table: Tensor, entries: int) -> Tensor:
    """[N, blocks] values per block of ``_ALIGN`` entries as [N, entries] (an indexing expression when compiled)."""
    return table.unsqueeze(-1).expand(*table.shape, _ALIGN).reshape(table.shape[0], -1)[:, :entries]


def _value_range(stored: Tensor) -> Tensor:
    """``[min, max]`` of the stored entries of a merge: both finite iff every entry is (NaN propagates into both,
    ``±inf`` shows in one). Taken on the stored dtype, it also catches fp32 values that overflow a bf16/fp16 model.
    One cheap pass after the merge kernel, not inside it: compiled on CPU, a reduction fused into the merge kernel
    slows the kernel down several times."""
    return torch.stack(torch.aminmax(stored.reshape(-1)))


# Inductor options that keep compiled arithmetic bit-identical to eager: no fused multiply-add contraction, IEEE
# division (Triton's default x / y is approximate).
_EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True}


def _bounded_put(cache: dict, key: object, value: object) -> None:
    """Insert into a dict used as a FIFO cache of at most ``_CACHE_ENTRIES`` entries."""
    if len(cache) >= _CACHE_ENTRIES:
        del cache[next(iter(cache))]
    cache[key] = value


class MergeEngine:
    """Holds base + sources on a device and writes merges into a live model.

    Parameters
    ----------
    models:
        Paths of every model a recipe may name (base and sources), all of one architecture.
    device:
        ``"cuda"``, ``"cpu"`` or a torch device; default: CUDA when available.
    dtype:
        dtype of the live model (``"float32"``, ``"bfloat16"``, ``"float16"``); default: the first model's.
    memory_budget:
        bytes of source tensors allowed on the compute device; above it they stay in pinned CPU memory and are
        streamed per tensor. Default: no limit on CPU, 80% of free memory on CUDA.
    allow_pickle:
        read ``pytorch_model.bin`` checkpoints (with ``torch.load(weights_only=True)``).
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        memory_budget: int | None = None,
        allow_pickle: bool = False,
    ) -> None:
        if not models:
            raise RecipeError("MergeEngine needs at least one model path")
        self.paths = [str(p) for p in models]
        self.device = compute_device(device)
        if self.device.type == "cpu":
            keep_cpu_heap()
        self.checkpoints = [Checkpoint.open(p, allow_pickle=allow_pickle) for p in self.paths]
        check_compatible(self.checkpoints)
        first = self.checkpoints[0]
        self.names = [n for n in first.names if first.dtype(n).is_floating_point]
        self.num_layers = first.num_layers
        self.dtype = self._dtype(dtype, first)
        self.model = load_model(self.paths[0], device=self.device, dtype=self.dtype)
        self._targets = self._target_tensors(self.model, first.names)
        self._spans = self._layout(first)
        storage = self._storage_device(memory_budget)
        self._flat = self._allocate_sources(storage)
        self._stacks = {n: self._read_stack(n, storage) for n in self.names}
        self._out = self._bind_targets()
        self._last: dict[str, tuple] = {}
        self._statistics: dict[str, list[dict[str, Tensor]]] = {}
        self._threshold_cache: dict[tuple, Tensor] = {}
        self._gram_cache: dict[tuple, Tensor] = {}  # MergeMethod.gram per (method, tensor, base, sources, flags)
        self._device_params: dict[tuple, Tensor] = {}
        self._compiled: dict[str, Callable[..., Tensor] | None] = {}
        self._chunk = _CPU_CHUNK
        self._noise_cache: dict[tuple[int, int], tuple[Tensor, set[str]]] = {}
        free = self._free_memory()
        self._noise_budget = int(_NOISE_CACHE_SHARE * free)
        self._sorted: dict[tuple[str, int, int], SortedMagnitudes] = {}
        self._ranks: dict[tuple[str, int, tuple[int, ...]], Tensor] = {}
        self._task_budget = int(_TASK_CACHE_SHARE * free)
        self._budget_lock = threading.Lock()

    # --------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _dtype(dtype: str | torch.dtype | None, first: Checkpoint) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype is None:
            return first.dtype(first.names[0])
        if dtype not in DTYPES:
            raise RecipeError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]

    @staticmethod
    def _target_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
        live = dict(model.state_dict(keep_vars=True))
        missing = [n for n in names if n not in live]
        if missing:
            raise RecipeError(
                f"the live model has no tensor named {missing[:3]} (of {len(missing)} missing); "
                "is the checkpoint saved by a different transformers architecture than its config says?"
            )
        return {n: live[n] for n in names}

    def _storage_device(self, memory_budget: int | None) -> torch.device:
        if self.device.type == "cpu":
            return self.device
        need = sum(ck.nbytes(n) for ck in self.checkpoints for n in self.names)
        budget = memory_budget if memory_budget is not None else int(0.8 * torch.cuda.mem_get_info(self.device)[0])
        if need <= budget:
            return self.device
        log.info("sources need %.1f GiB > budget %.1f GiB: streaming from pinned CPU memory",
                 need / 2**30, budget / 2**30)
        return torch.device("cpu")

    def _layout(self, first: Checkpoint) -> dict[str, _Span]:
        """Offsets of the merged tensors in the flat buffers, in ``self.names`` order, each aligned to ``_ALIGN``."""
        spans, offset = {}, 0
        for name in self.names:
            shape = torch.Size(first.shape(name))
            spans[name] = _Span(offset, math.prod(shape), shape)
            offset += -(-spans[name].numel // _ALIGN) * _ALIGN
        self._total = offset
        return spans

    def _allocate_sources(self, storage: torch.device) -> Tensor:
        """Zeroed [models, entries] buffer in the checkpoints' common dtype (pinned when streamed to CUDA)."""
        dtype = self.checkpoints[0].dtype(self.names[0]) if self.names else torch.float32
        for ck in self.checkpoints:
            for name in self.names:
                dtype = torch.promote_types(dtype, ck.dtype(name))
        pin = storage.type == "cpu" and self.device.type == "cuda"
        return torch.zeros(len(self.paths), self._total, dtype=dtype, device=storage, pin_memory=pin)

    def _read_stack(self, name: str, storage: torch.device) -> Tensor:
        """Read ``name`` of every model into the flat buffer; the [models, *shape] view of it there."""
        span = self._spans[name]
        stack = self._flat[:, span.offset : span.offset + span.numel]
        for i, ck in enumerate(self.checkpoints):
            tensor = ck.get(name)
            if not all_finite(tensor):
                raise RecipeError(f"tensor '{name}' holds NaN/Inf in ['{self.paths[i]}']; it cannot be merged")
            stack[i].copy_(tensor.reshape(-1))
        return stack.view(len(self.paths), *span.shape)

    def _bind_targets(self) -> Tensor | None:
        """Rebind the live model's merged tensors to views of one flat buffer laid out like the sources, so a run
        of consecutive tensors is written as one slice. None (per-tensor writes) when they cannot share one
        buffer: tensors shared between names (tied weights), another dtype or device, or none to merge."""
        live = [self._targets[n] for n in self.names]
        shared = len({t.data_ptr() for t in live}) < len(live)
        if not live or shared or any(t.dtype != self.dtype or t.device.type != self.device.type for t in live):
            return None
        out = torch.zeros(self._total, dtype=self.dtype, device=live[0].device)
        for name, tensor in zip(self.names, live):
            span = self._spans[name]
            view = out[span.offset : span.offset + span.numel].view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
        self._bound = [t.data_ptr() for t in live]
        return out

    def _free_memory(self) -> int:
        """Bytes free on the compute device (CUDA: free device memory; CPU: available physical memory)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 0

    def _check_binding(self) -> None:
        """Rebind when the live tensors were replaced since (e.g. by ``model.to``), keeping their values."""
        if self._out is not None and [self._targets[n].data_ptr() for n in self.names] != self._bound:
            self._out = self._bind_targets()

    # ------------------------------------------------------------------------------------------- recipes
    def indices(self, recipe: Recipe) -> tuple[int | None, list[int]]:
        """Positions of the recipe's base and sources among the engine's models."""
        where = {p: i for i, p in enumerate(self.paths)}
        unknown = [p for p in recipe.model_paths() if p not in where]
        if unknown:
            raise RecipeError(f"recipe names models the engine was not loaded with: {unknown}; loaded: {self.paths}")
        base = where[recipe.base] if recipe.base else None
        return base, [where[s.model] for s in recipe.sources]

    def check(self, recipe: Recipe) -> MergeMethod:
        """Validate a recipe against the registry and the loaded models before any tensor work."""
        if recipe.method == "passthrough":
            raise RecipeError("passthrough changes the layer count; build it with evomerge.stacking.stack_layers")
        method = get_method(recipe.method)
        self.indices(recipe)
        if recipe.dtype is not None and DTYPES[recipe.dtype] != self.dtype:
            raise RecipeError(f"recipe dtype {recipe.dtype} differs from the live model's {self.dtype}")
        if method.statistic and method.statistic not in self._statistics:
            raise RecipeError(
                f"method '{method.name}' needs '{method.statistic}' statistics; call engine.set_statistics"
                f"('{method.statistic}', ...) (statistics from evomerge.methods.statistics: fisher_diagonal / "
                "gram_matrices, one dict per model)"
            )
        return method

    @staticmethod
    def _kwargs(method: MergeMethod, params: Mapping[str, object], n: int) -> dict[str, object]:
        """Keyword arguments of ``method.fn``: per-source parameters as float64 CPU tensors [n] (the recipe's values
        as mergekit's Python floats hold them: keep counts ``⌊d·n⌋`` are counted from them), globals as is."""
        kwargs: dict[str, object] = {}
        for p in method.params:
            value = params.get(p.name, p.default)
            if p.per_source:
                values = value if isinstance(value, list) else [value] * n
                value = torch.tensor(values, dtype=torch.float64)
            kwargs[p.kwarg or p.name] = value
        return kwargs

    def _on_device(self, kwargs: Mapping[str, object]) -> dict[str, object]:
        """``kwargs`` with its tensors on the compute device (cached by value: no copy per tensor and candidate)."""
        if self.device.type == "cpu":
            return dict(kwargs)
        moved: dict[str, object] = {}
        for key, value in kwargs.items():
            if isinstance(value, Tensor) and value.device.type == "cpu":
                cache_key = (key, str(value.dtype), tuple(value.tolist()))
                if cache_key not in self._device_params:
                    _bounded_put(self._device_params, cache_key, value.to(self.device))
                value = self._device_params[cache_key]
            moved[key] = value
        return moved

    # --------------------------------------------------------------------------------------------- merging
    def plan(self, recipe: Recipe) -> tuple[MergeMethod, int | None, list[int], dict[str, dict[str, object]]]:
        """Validate ``recipe`` and resolve its parameters for every tensor, before any tensor work.

        Every tensor's resolved values are checked against the method's ranges, so a gradient or a per-filter
        value that is out of range anywhere in the stack fails here, not half-way through a merge.
        """
        method = self.check(recipe)
        base, sources = self.indices(recipe)
        resolved = {n: resolve_params(recipe, method, n, self.num_layers) for n in self.names}
        seen: set[str] = set()
        for params in resolved.values():
            key = repr(sorted(params.items()))
            if key not in seen:
                seen.add(key)
                validate_params(method, params, len(sources), base is not None)
        return method, base, sources, resolved

    def materialize(self, recipe: Recipe) -> MergeStats:
        """Write the merge described by ``recipe`` into ``self.model`` in place; returns what was done.

        Raises MergeError naming the tensor when a merged tensor holds NaN/Inf; the tensors merged by that call
        are then merged again by the next one.
        """
        method, base, sources, resolved = self.plan(recipe)
        seed = recipe.seed if method.stochastic else None
        keys = {n: (method.name, base, tuple(sources), repr(sorted(p.items())), seed) for n, p in resolved.items()}
        stats = MergeStats()
        start = time.perf_counter()
        with torch.no_grad():
            self._check_binding()
            todo = [n for n in self.names if self._last.get(n) != keys[n]]
            for name in todo:
                self._last.pop(name, None)
            self._prefetch(method, todo, base, sources)
            checks = [
                (run, self._merge_run(method, base, sources, run, resolved[run[0]], recipe.seed))
                for run in self._runs(method, todo, keys, recipe.seed, len(sources))
            ]
            self._verify(method, checks)
        for name in todo:
            self._last[name] = keys[name]
            stats.bytes_moved += self._stacks[name][0].nbytes * (len(sources) + (base is not None)) + \
                self._targets[name].nbytes
        stats.merged, stats.skipped, stats.names = len(todo), len(self.names) - len(todo), todo
        stats.seconds = time.perf_counter() - start
        return stats

    def _runs(
        self, method: MergeMethod, todo: list[str], keys: Mapping[str, tuple], seed: int, n_sources: int
    ) -> list[list[str]]:
        """Tensors merged together: maximal runs of neighbours (in the flat layout) with the same parameters, for
        entrywise methods when the live tensors share one buffer (and, for stochastic ones, when the draws of the
        seed fit the noise store); else one each (angle-based methods: coefficients per tensor; DELLA: ranks)."""
        per_tensor_inputs = method.gram is not None or method.ranked
        groupable = method.elementwise and not method.statistic and not per_tensor_inputs and self._out is not None \
            and (not method.stochastic or self._noise_store(seed, n_sources) is not None)
        if not groupable:
            return [[name] for name in todo]
        position = {n: i for i, n in enumerate(self.names)}
        runs: list[list[str]] = []
        for name in todo:
            last = runs[-1][-1] if runs else None
            if last is not None and position[last] + 1 == position[name] and keys[last] == keys[name]:
                runs[-1].append(name)
            else:
                runs.append([name])
        return runs

    def _merge_run(
        self, method: MergeMethod, base: int | None, sources: list[int], run: list[str],
        params: Mapping[str, object], seed: int,
    ) -> Tensor:
        """Merge the tensors of ``run`` (one tensor, or a run of an entrywise method) into the live model;
        returns a 0-d tensor that is finite iff the merged values are (checked later, all at once)."""
        host = self._kwargs(method, params, len(sources))
        inputs = self._entrywise_inputs(method, run, base, sources, host, seed)
        if inputs is None:
            merged = self._merge_whole(method, run[0], base, sources, params, seed)
            self._targets[run[0]].copy_(merged)
            return _value_range(self._targets[run[0]])
        begin, end = self._spans[run[0]].offset, self._spans[run[-1]].offset + self._spans[run[-1]].numel
        rows = _rows(self._flat[:, begin:end], sources).to(self.device, non_blocking=True)
        base_row = None if base is None else self._flat[base, begin:end].to(self.device, non_blocking=True)
        out = self._out[begin:end] if self._out is not None else self._targets[run[0]].view(-1)
        kwargs = self._on_device(host)
        self._kernel(method.name, _fused_merge, out.shape[0],
                     lambda begin, end, f: f(method.fn, out[begin:end], rows[:, begin:end],
                                             None if base_row is None else base_row[begin:end], kwargs,
                                             inputs.chunk(begin, end)))
        return _value_range(out)

    def _entrywise_inputs(
        self, method: MergeMethod, run: list[str], base: int | None, sources: list[int], host: dict[str, object],
        seed: int,
    ) -> _Inputs | None:
        """What makes ``method`` entrywise on ``run``: thresholds, draws, ranks (returned) and angle-based
        coefficients (added to ``host``). None when the run must be merged whole by the plain formula: a method
        that is not entrywise or needs data statistics, a live tensor that is not contiguous and not bound, a
        combination per output row, ranks that do not fit their budget."""
        if not method.elementwise or method.statistic:
            return None
        if self._out is None and not self._targets[run[0]].is_contiguous():
            return None
        inputs = _Inputs()
        if method.gram is not None:
            host["coefficients"] = self._coefficients(method, run[0], base, sources, host)
            if host["coefficients"].shape[0] > 1:  # type: ignore[union-attr]
                return None
        if method.ranked:
            ranks = self._relative_ranks(run[0], base, sources)  # type: ignore[arg-type]
            if ranks is None:
                return None
            inputs.entries["ranks"] = ranks
        if method.keep_counts is not None:
            inputs.blocks["thresholds"] = self._threshold_tables(method, run, base, sources, host)
        if method.stochastic and self._noise_store(seed, len(sources)) is not None:
            inputs.entries["noise"] = self._noise(run, seed, len(sources))
        elif method.stochastic:  # nothing stored: the run is one tensor (_runs), drawn in the kernel
            inputs.keys = row_keys(tensor_seed(seed, run[0]), len(sources)).to(self.device, non_blocking=True)
        return inputs

    def _kernel(self, name: str, fn: Callable[..., None], size: int,
                call: Callable[[int, int, Callable[..., None]], None]) -> None:
        """Run an entrywise kernel over ``size`` entries: ``call(begin, end, f)`` applies ``f`` (``fn`` or its
        compiled form) to entries ``[begin, end)``. Compiled (:meth:`_compiled_fn`): once over all entries, falling
        back to eager for good when compiling fails; eager on CPU: in chunks of ``self._chunk`` entries, each
        upcast, computed and cast while its fp32 temporaries are in cache (entrywise: identical to one call)."""
        compiled = self._compiled_fn(name, fn)
        if compiled is not None:
            try:
                call(0, size, compiled)
                return
            except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to the eager formula
                log.warning("torch.compile of the %s kernel failed (%s); running it eagerly", name, error)
                self._compiled[name] = None
        step = self._chunk if self.device.type == "cpu" else max(size, 1)
        for begin in range(0, size, step):
            call(begin, min(begin + step, size), fn)

    def _compiled_fn(self, name: str, fn: Callable[..., None]) -> Callable[..., None] | None:
        """``fn`` compiled by ``torch.compile`` (once per name, e.g. a method; shapes are dynamic), or None when
        disabled or an earlier call failed to compile. ``EVOMERGE_COMPILE=1`` / ``0`` forces it on / off; unset, it
        is on for models of at least ``_COMPILE_MIN_ENTRIES`` entries (where it pays for its compile time)."""
        if name not in self._compiled:
            setting = os.environ.get("EVOMERGE_COMPILE")
            enabled = self._total >= _COMPILE_MIN_ENTRIES if setting is None else setting != "0"
            if enabled:
                # one graph per method and flag combination; the default limit (8 per function) is too low
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled[name] = torch.compile(
                fn, dynamic=True, fullgraph=True, options=_EAGER_NUMERICS) if enabled else None
        return self._compiled[name]

    def _thresholds(
        self, method: MergeMethod, name: str, base: int | None, sources: list[int], host: Mapping[str, object]
    ) -> tuple[Tensor, ...]:
        """Exact magnitude thresholds [N] of ``method.keep_counts`` for tensor ``name``, cached per (tensor, base,
        sources, keep counts): they depend on nothing else, so candidates that keep the counts reuse them. New
        counts are looked up in the sorted magnitudes of each task vector (CPU, when they fit their budget: a
        search over densities then sorts each task vector once), else found by :func:`kth_magnitudes`."""
        span = self._spans[name]
        thresholds, tau = [], None
        for counts in method.keep_counts(host, span.numel):  # type: ignore[misc]
            key = (name, base, tuple(sources), tuple(counts.tolist()))
            if key not in self._threshold_cache:
                rows = self._sorted_rows(name, base, sources)  # type: ignore[arg-type]
                if rows is not None:
                    found = [row.kth_largest(k) if k > 0 else math.nan for row, k in zip(rows, counts.tolist())]
                    value = torch.tensor(found, dtype=torch.float32, device=self.device)
                else:
                    if tau is None:
                        tau = self._task_vectors(name, base, sources)  # type: ignore[arg-type]
                    value = kth_magnitudes(tau, counts)
                _bounded_put(self._threshold_cache, key, value)
            thresholds.append(self._threshold_cache[key])
        return tuple(thresholds)

    def _prefetch(self, method: MergeMethod, names: list[str], base: int | None, sources: list[int]) -> None:
        """Before a candidate's merges, compute the per-task-vector facts its tensors miss (sorted magnitudes for
        CPU thresholds, DELLA's ranks) in ``torch.get_num_threads()`` threads, a tensor per job: their numpy sorts
        release the GIL. Nothing to do (no job, no thread pool) once they are kept; whatever does not fit the
        budget is left to the per-candidate path."""
        if base is None:
            return
        jobs: list[Callable[[], object]] = []
        if method.keep_counts is not None and self.device.type == "cpu":
            jobs += [lambda name=name: self._sorted_rows(name, base, sources) for name in names
                     if any((name, base, i) not in self._sorted for i in sources)]
        if method.ranked:
            jobs += [lambda name=name: self._relative_ranks(name, base, sources) for name in names
                     if (name, base, tuple(sources)) not in self._ranks]
        workers = min(len(jobs), torch.get_num_threads())
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="evomerge-prefetch") as pool:
                list(pool.map(lambda job: job(), jobs))

    def _reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` (may be negative: a correction) from the budget of per-task-vector facts; False, taking
        nothing, when a positive amount does not fit."""
        with self._budget_lock:
            if nbytes > 0 and nbytes > self._task_budget:
                return False
            self._task_budget -= nbytes
            return True

    def _sorted_rows(self, name: str, base: int, sources: list[int]) -> list[SortedMagnitudes] | None:
        """The sorted magnitudes of ``τ_i = source_i − base`` for tensor ``name``, each sorted once per (tensor,
        base, source) and kept; None when the missing ones do not fit the budget (always on CUDA, where
        ``torch.topk`` is fast)."""
        missing = [i for i in dict.fromkeys(sources) if (name, base, i) not in self._sorted]
        estimate = len(missing) * self._spans[name].numel * 2
        if self.device.type != "cpu" or not self._reserve(estimate):
            return None
        for i in missing:
            built = SortedMagnitudes.build(self._task_vectors(name, base, [i]).abs_())
            self._sorted[(name, base, i)] = built
            self._reserve(built.nbytes - built.numel * 2)  # the run-length table beyond the estimate
        return [self._sorted[(name, base, i)] for i in sources]

    def _threshold_tables(
        self, method: MergeMethod, run: list[str], base: int | None, sources: list[int], host: Mapping[str, object]
    ) -> tuple[Tensor, ...]:
        """Per fraction, the thresholds of every tensor of ``run`` as an [N, blocks] table: one column per block of
        ``_ALIGN`` entries (tensors start on block boundaries, so every block belongs to one tensor)."""
        per_tensor = [self._thresholds(method, name, base, sources, host) for name in run]
        if len(run) == 1:
            columns = -(-self._spans[run[0]].numel // _ALIGN)
            return tuple(t.view(-1, 1).expand(-1, columns) for t in per_tensor[0])
        blocks = torch.tensor([-(-self._spans[n].numel // _ALIGN) for n in run], device=self.device)
        total = int(sum(-(-self._spans[n].numel // _ALIGN) for n in run))
        return tuple(
            torch.repeat_interleave(torch.stack(column, dim=1), blocks, dim=1, output_size=total)
            for column in zip(*per_tensor)
        )

    def _relative_ranks(self, name: str, base: int, sources: list[int]) -> Tensor | None:
        """:func:`relative_ranks` of the task vectors of ``sources`` for tensor ``name`` as [N, numel] on the compute
        device, computed once per (tensor, base, sources) and kept; None when they do not fit the budget."""
        key = (name, base, tuple(sources))
        if key not in self._ranks:
            if not self._reserve(len(sources) * self._spans[name].numel * 4):
                return None
            self._ranks[key] = relative_ranks(self._task_vectors(name, base, sources))
        return self._ranks[key]

    def _fp32(self, name: str, base: int | None, sources: list[int]) -> tuple[Tensor | None, Tensor]:
        """Tensor ``name`` of the base ([*S], None without a base) and of the sources ([N, *S]), fp32 on the compute
        device."""
        stack = self._stacks[name]
        src = _rows(stack, sources).to(self.device, torch.float32, non_blocking=True)
        base_t = None if base is None else stack[base].to(self.device, torch.float32, non_blocking=True)
        return base_t, src

    def _task_vectors(self, name: str, base: int, sources: list[int]) -> Tensor:
        """``τ_i = source_i − base`` of tensor ``name`` as [N, numel], fp32 on the compute device."""
        base_t, src = self._fp32(name, base, sources)
        return (src - base_t).view(len(sources), -1)

    def _coefficients(
        self, method: MergeMethod, name: str, base: int | None, sources: list[int], kwargs: Mapping[str, object]
    ) -> Tensor:
        """An angle-based method's combination for tensor ``name`` (``method.coefficients`` of its Gram matrices,
        which are computed once per (method, tensor, base, sources, flags) and kept), on the compute device."""
        flags = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool)))
        key = (method.name, name, base, tuple(sources), flags)
        if key not in self._gram_cache:
            base_t, src = self._fp32(name, base, sources)
            _bounded_put(self._gram_cache, key, method.gram(base_t, src, kwargs))  # type: ignore[misc]
        return method.coefficients(self._gram_cache[key], kwargs).to(self.device, torch.float32)  # type: ignore[misc]

    def _noise_store(self, seed: int, n_sources: int) -> tuple[Tensor, set[str]] | None:
        """Flat [N, entries] buffer of the uniform draws of ``seed`` (laid out like the sources) and the tensors
        drawn into it so far; None when it does not fit ``_NOISE_CACHE_SHARE`` of the free memory. Stores of other
        seeds are dropped first (a search keeps one seed); a dropped buffer of the same size is reused (no new pages
        to fault in)."""
        key = (seed, n_sources)
        if key not in self._noise_cache:
            reuse = None
            for other in [k for k in self._noise_cache if k != key]:
                buffer, _ = self._noise_cache.pop(other)
                reuse = buffer if other[1] == n_sources else None
            if n_sources * self._total * 4 > self._noise_budget:
                return None
            if reuse is None:
                reuse = torch.empty(n_sources, self._total, dtype=torch.float32, device=self.device)
            self._noise_cache[key] = (reuse, set())
        return self._noise_cache[key]

    def _noise(self, run: list[str], seed: int, n_sources: int) -> Tensor:
        """The stored uniform draws of the tensors of ``run`` as [N, run entries] (tensors not drawn yet for
        ``seed`` are drawn into the store first: :func:`_draw_into`, one fused hash kernel when compiled). Reading
        the store is cheaper than hashing again in the merge kernel on CPU (~1 ns per entry and source on 2 cores)."""
        buffer, drawn = self._noise_store(seed, n_sources)  # type: ignore[misc]
        for name in run:
            if name not in drawn:
                span = self._spans[name]
                target = buffer[:, span.offset : span.offset + span.numel]
                keys = row_keys(tensor_seed(seed, name), n_sources).to(self.device, non_blocking=True)
                self._kernel("draws", _draw_into, span.numel,
                             lambda begin, end, f, target=target, keys=keys: f(target[:, begin:end], keys, begin))
                drawn.add(name)
        begin, end = self._spans[run[0]].offset, self._spans[run[-1]].offset + self._spans[run[-1]].numel
        return buffer[:, begin:end]

    def _verify(self, method: MergeMethod, checks: list[tuple[list[str], Tensor]]) -> None:
        """One synchronisation for the whole candidate: MergeError naming the first tensor whose stored entries
        hold NaN/Inf (only runs whose check value is non-finite are inspected, with the exact float64 check)."""
        if not checks:
            return
        finite = torch.isfinite(torch.stack([c.float() for _, c in checks])).all(1).tolist()
        for (run, _), ok in zip(checks, finite):
            bad = [] if ok else [n for n in run if not all_finite(self._targets[n].float())]
            if bad:
                raise MergeError(f"merge of '{bad[0]}' with {method.name} produced NaN/Inf; check its parameters")

    def _merge_whole(
        self, method: MergeMethod, name: str, base: int | None, sources: list[int],
        params: Mapping[str, object], seed: int,
    ) -> Tensor:
        """``method.fn`` on the whole fp32 tensor, by the plain formula (no chunks, no caches)."""
        base_t, src = self._fp32(name, base, sources)
        stats = self._tensor_statistics(method, name, sources)
        kwargs = self._on_device(self._kwargs(method, params, len(sources)))
        if method.gram is not None:
            kwargs["coefficients"] = self._coefficients(method, name, base, sources, kwargs)
        seed_of_tensor = tensor_seed(seed, name) if method.stochastic else None
        return method.fn(base_t, src, seed=seed_of_tensor, stats=stats, **kwargs)

    def invalidate(self) -> None:
        """Forget what the live model holds, so the next materialize merges every tensor (use after changing
        the model's weights by other means)."""
        self._last.clear()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by what the engine keeps across candidates (beyond the models themselves): stored DARE/DELLA
        draws, sorted task-vector magnitudes, DELLA ranks, Gram matrices, thresholds."""
        return {
            "draws": sum(buffer.nbytes for buffer, _ in self._noise_cache.values()),
            "sorted_magnitudes": sum(entry.nbytes for entry in self._sorted.values()),
            "ranks": sum(t.nbytes for t in self._ranks.values()),
            "gram": sum(t.nbytes for t in self._gram_cache.values()),
            "thresholds": sum(t.nbytes for t in self._threshold_cache.values()),
        }

    def clear_caches(self) -> None:
        """Drop everything :meth:`cache_bytes` counts (e.g. before switching to a search over other sources); it is
        recomputed when needed."""
        held = self.cache_bytes()
        self._reserve(-held["sorted_magnitudes"] - held["ranks"])  # give their budget back
        self._noise_cache.clear()
        self._sorted.clear()
        self._ranks.clear()
        self._gram_cache.clear()
        self._threshold_cache.clear()

    # ---------------------------------------------------------------------------------------- statistics
    def set_statistics(self, kind: str, per_model: Sequence[Mapping[str, Tensor]]) -> None:
        """Data statistics (``fisher`` diagonals or ``gram`` matrices) for each engine model, in model order."""
        if len(per_model) != len(self.paths):
            raise RecipeError(f"need {kind} statistics for all {len(self.paths)} models, got {len(per_model)}")
        self._statistics[kind] = [dict(m) for m in per_model]
        self.invalidate()

    def has_statistics(self, kind: str) -> bool:
        return kind in self._statistics

    def _tensor_statistics(self, method: MergeMethod, name: str, sources: list[int]) -> Tensor | None:
        if not method.statistic:
            return None
        per_model = self._statistics[method.statistic]
        if name not in per_model[sources[0]]:
            return None
        return torch.stack([per_model[i][name] for i in sources]).to(self.device, torch.float32)

    # ------------------------------------------------------------------------------------------- output
    def state_dict(self) -> dict[str, Tensor]:
        """The live model's tensors under the checkpoint's names (CPU copies)."""
        return {n: t.detach().to("cpu").contiguous() for n, t in self._targets.items()}

    def export(self, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, force: bool = False) -> Path:
        """Write the live model as an HF dir (atomic; refuses an existing dir unless ``force``), with the tokenizer
        files of ``tokenizer_dir`` when given."""
        return save_hf_dir(self.state_dict(), out_dir, config=self.model.config, tokenizer_dir=tokenizer_dir,
                           force=force)
