"""Memory planning: before any model is loaded, what the engine will hold against what the machine has free.

The engine holds the live model (every parameter in the live dtype; twice for a moment, while its merged tensors are
rebound into one flat buffer), the sources (every model's merged tensors in
their common dtype, unless memory-mapped) and, per candidate, the working set of the largest tensor
(:func:`working_set_bytes`: a formula's fp32 copies, the TIES family's exact magnitude selection, or DELLA's
magnitude ranks, whichever needs more). :func:`plan_memory` chooses where the sources live:

- ``resident``: copied into one flat buffer per model (fastest; runs of tensors merge as one slice);
- ``mapped``: left in the safetensors files, memory-mapped and read per tensor (the page cache holds them, and
  the kernel can drop those pages under pressure instead of killing the process);

and refuses, with the numbers, when even the mapped plan does not fit. ``evomerge merge`` (the streaming merge, no
live model) holds one output shard and one whole-tensor call on its largest tensor
(:func:`stream_working_set_bytes`); :func:`check_stream_memory` refuses it the same way. Merges that hold a whole
new model (a layer stack, :func:`layer_stack_bytes`; a mixture of experts) name what they hold as :class:`Need`
parts and are refused by :func:`check_fits` with the same numbers. Free memory on CPU is the smaller of the
machine's available memory and what the process's cgroup (v1 or v2) still allows, reclaimable page cache counted as
free.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.methods.spec import MergeMethod
from evomerge.naming import layer_index
from evomerge.outdir import format_size
from evomerge.recipe import RecipeError

if TYPE_CHECKING:
    from evomerge.checkpoint import Checkpoint

__all__ = ["MemoryPlan", "MemoryPlanError", "Need", "RANK_BYTES", "SELECT_BYTES", "SORT_BYTES", "adapter_bytes",
           "adapter_run_bytes", "adapter_select_bytes", "available_bytes", "check_fits", "check_stream_memory",
           "layer_stack_bytes", "model_working_set", "plan_memory", "rank_bytes", "stream_working_set_bytes",
           "working_set_bytes"]

log = logging.getLogger(__name__)

HEADROOM = 0.9  # plan within this share of what is free: the allocator, Python and the evaluator need the rest

#: Bytes per entry of the exact magnitude selection over one whole task vector (TIES / breadcrumbs thresholds,
#: ``KeptInputs.thresholds``: :func:`evomerge.methods.sparsify.kth_magnitudes` of one source's
#: ``SourceStacks.task_vectors`` at a time), by device type. CPU (radix select,
#: :func:`evomerge.methods.select.radix_kth_largest_rows`): τ (fp32) 4, |τ| (fp32) 4, the high halves as bucket ids
#: (int32, offset in place) 4, the mask of the k-th bucket (bool) 1. CUDA (``torch.topk``, up to every entry kept):
#: τ 4, |τ| 4, the top values (fp32) 4 and their int64 indices 8.
SELECT_BYTES = {"cpu": 13, "cuda": 20}
#: Bytes per entry of sorting one task-vector row on CPU (``KeptInputs.sorted_rows`` ->
#: :meth:`evomerge.methods.select.SortedMagnitudes.build`, one job per tensor in ``torch.get_num_threads()``
#: threads): τ (fp32, made absolute in place) 4, NumPy's sorted copy of its bit patterns (int32) 4, their high
#: halves (int32) 4, the low halves (int32 4, then the kept uint16 copy 2).
SORT_BYTES = 18
#: Bytes per entry of DELLA's magnitude ranks of one tensor's N task vectors (``KeptInputs.relative_ranks`` ->
#: :func:`evomerge.methods.sparsify.relative_ranks`), as (per source, once): CPU
#: (:func:`evomerge.methods.select.magnitude_ranks`): τ (fp32) 4, |τ| (fp32) 4 and the int64 ranks 8 per source, and
#: for the row being sorted its int64 keys ``bits << 32 | index`` 8, their shifted copy 8, the int64 index 8 and
#: run starts 8 and the bool run mask 1; then, the row arrays freed, the ranks as fp32 and divided (4 + 4 per source
#: beside the int64 ones: 20 per source). CUDA (``sort`` + ``searchsorted``): τ 4, |τ| 4, the sorted values 4 and
#: the int64 sort indices, then the int64 positions, 8 (counted from the operations, not measured).
RANK_BYTES = {"cpu": ((16, 33), (20, 0)), "cuda": ((20, 0),)}


def rank_bytes(n_sources: int, device_type: str) -> int:
    """Bytes per entry of DELLA's ranks of ``n_sources`` task vectors: the largest ``a * n_sources + b`` of
    :data:`RANK_BYTES` (0 without a source)."""
    if n_sources < 1:
        return 0
    return max(a * n_sources + b for a, b in RANK_BYTES["cuda" if device_type == "cuda" else "cpu"])


def working_set_bytes(*, largest_tensor: int, n_models: int, device_type: str, sorted_entries: int = 0,
                      ranked: bool = True) -> int:
    """Peak bytes of merging one tensor beyond the sources and the live model: the largest of

    - a formula on the whole tensor: the sources' rows, the base, the result and the temporaries, about
      ``n_models + 3`` fp32 copies of the largest tensor (``largest_tensor`` entries);
    - the exact magnitude selection of the TIES family, one task vector at a time:
      ``SELECT_BYTES[device_type] * largest_tensor``;
    - on CPU, the threads sorting task vectors at once: ``SORT_BYTES * sorted_entries`` (``sorted_entries``: the
      entries of the ``torch.get_num_threads()`` largest tensors, each sorted by its own thread);
    - DELLA's ranks of every source's task vector (``n_models - 1``: the others against the base), one tensor per
      thread as the sorts: ``rank_bytes(n_models - 1) * sorted_entries``; left out when ``ranked`` is false (no
      method that ranks magnitudes will run).

    The engine is planned before any recipe is known, so it plans for the method that needs most (of the methods
    it is told will run)."""
    formula = (n_models + 3) * 4 * largest_tensor
    select = SELECT_BYTES["cuda" if device_type == "cuda" else "cpu"] * largest_tensor
    ranks = rank_bytes(n_models - 1, device_type) * sorted_entries if ranked else 0
    return max(formula, select, SORT_BYTES * sorted_entries if device_type == "cpu" else 0, ranks)


def model_working_set(first: Checkpoint, names: Sequence[str], *, n_models: int, device_type: str,
                      ranked: bool = True) -> int:
    """:func:`working_set_bytes` of an engine over ``n_models`` models shaped as ``first`` (merging ``names``): its
    largest tensor, and the ``torch.get_num_threads()`` largest that threads sort at once."""
    entries = sorted((math.prod(first.shape(n)) for n in names), reverse=True)
    return working_set_bytes(largest_tensor=entries[0] if entries else 0, n_models=n_models, device_type=device_type,
                             sorted_entries=sum(entries[:torch.get_num_threads()]), ranked=ranked)


def adapter_bytes(itemsize: int) -> int:
    """Bytes per entry of forming one adapter source's tensor ``W + s·B·A``
    (:func:`evomerge.adapters.adapted_tensor`, what the engine's adapter rows and the streaming merge's
    ``AdapterCheckpoint.get`` call) beyond the rows the merge holds: the base tensor ``W`` as read (``itemsize``),
    ``B·A`` and its scaled copy ``ΔW`` (fp32, 4 + 4), and when ``W`` is not fp32 its fp32 copy beside ``ΔW`` and their
    sum (4)."""
    return itemsize + 8 + (0 if itemsize == 4 else 4)


def adapter_select_bytes(*, largest_adapted: int, n_models: int, itemsize: int) -> int:
    """Peak bytes of reading one whole tensor (``largest_adapted`` entries, the largest an adapter adapts) of every
    source when adapters are among them (``LowRankStacks._select``): each source's row in the common dtype
    (``itemsize``) in a list, then stacked (``2 (n_models - 1) itemsize`` per entry), and one adapter's tensor being
    formed (:func:`adapter_bytes`)."""
    return (2 * (n_models - 1) * itemsize + adapter_bytes(itemsize)) * largest_adapted


def adapter_run_bytes(*, merged_entries: int, largest_adapted: int, n_models: int, itemsize: int) -> int:
    """Peak bytes of the rows of a run of tensors merged at once (resident sources, an entrywise method) when
    adapters are among the sources (``LowRankStacks.run_rows``): every source's entries of the run, up to every
    merged entry (``merged_entries``: a run spans the tensors that share their parameters, e.g. all of them), in the
    common dtype, plus one adapted tensor's copy and its forming."""
    return ((n_models - 1) * merged_entries * itemsize
            + (itemsize + adapter_bytes(itemsize)) * largest_adapted)


def stream_working_set_bytes(method: MergeMethod, *, largest_tensor: int, n_sources: int, base: bool) -> int:
    """Peak bytes of the streaming merge's call of ``method`` on its largest tensor (``largest_tensor`` entries) of
    ``n_sources`` sources: ``(a * n_sources + b) * largest_tensor`` with ``(a, b)`` the method's declared
    ``whole_tensor_bytes`` (the rows read and stacked, the base, the whole-tensor selection, ranks or draws, the
    result); a method that declares none, :func:`working_set_bytes`' formula and selection terms."""
    if method.whole_tensor_bytes is None:
        return working_set_bytes(largest_tensor=largest_tensor, n_models=n_sources + base, device_type="cpu")
    per_source, once = method.whole_tensor_bytes
    return (per_source * n_sources + once) * largest_tensor


class MemoryPlanError(RecipeError):
    """The models cannot be held in the memory this machine (or cgroup) has free; the message gives the numbers."""


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _cgroup_free(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes the process's memory cgroup still allows (limit minus usage, inactive file pages counted as free), or
    None without a limit. cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):  # v1
            base = root / "memory" / rel
            limit, usage = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
            stat_key = "total_inactive_file"
        elif controllers == "":  # v2 unified hierarchy
            base = root / rel
            limit, usage = _read_int(base / "memory.max"), _read_int(base / "memory.current")
            stat_key = "inactive_file"
        else:
            continue
        if limit is None or usage is None or limit >= 1 << 60:  # v1 reports "no limit" as a huge number
            return None
        inactive = 0
        try:
            for stat in (base / "memory.stat").read_text().splitlines():
                key, value = stat.split()
                if key == stat_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(limit - usage + inactive, 0)
    return None


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def available_bytes(device: torch.device) -> int:
    """Bytes free for the engine on ``device``: free CUDA memory, or on CPU the smaller of the machine's available
    memory and the cgroup's remaining allowance."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    cgroup = _cgroup_free()
    machine = _meminfo_available()
    return machine if cgroup is None else min(machine, cgroup)


@dataclass(frozen=True)
class MemoryPlan:
    """Where the sources live and the estimate behind the choice (bytes)."""

    sources: str  # "resident" | "mapped"
    live_model: int
    source_bytes: int
    working_set: int
    available: int
    run_rows: int = 0  # what resident sources add to the working set: adapters' rows of a run (adapter_run_bytes)

    @property
    def resident_need(self) -> int:
        return 2 * self.live_model + self.source_bytes + max(self.working_set, self.run_rows)

    @property
    def mapped_need(self) -> int:
        # the live model twice: binding its merged tensors into one flat buffer holds both copies for a moment
        return 2 * self.live_model + self.working_set


def plan_memory(*, live_model: int, source_bytes: int, working_set: int, n_models: int, available: int,
                run_rows: int = 0) -> MemoryPlan:
    """Choose ``resident`` when live model + sources + working set fit ``HEADROOM`` of ``available``, else
    ``mapped`` when the live model + working set fit (safetensors files are memory-mapped by their reader, pickle
    checkpoints by ``torch.load(weights_only=True, mmap=True)``); else
    :class:`MemoryPlanError` naming every number and what to change. ``working_set``: :func:`working_set_bytes`;
    ``run_rows``: the working set of resident sources when larger (:func:`adapter_run_bytes`: mapped sources merge
    one tensor at a time)."""
    working = working_set
    plan = MemoryPlan("resident", live_model, source_bytes, working, available, run_rows)
    budget = HEADROOM * available
    if plan.resident_need <= budget:
        return plan
    if plan.mapped_need <= budget:
        log.warning("the %d models need %s resident but %s is free: their tensors stay memory-mapped in the "
                    "safetensors files and are read per tensor (slower per candidate, same bits)",
                    n_models, _gib(plan.resident_need), _gib(available))
        return MemoryPlan("mapped", live_model, source_bytes, working, available, run_rows)
    raise MemoryPlanError(
        f"not enough memory: the live model and one tensor's working set need {_gib(plan.mapped_need)} (live model "
        f"{_gib(live_model)}, working set {_gib(working)}; the sources' {_gib(source_bytes)} stay memory-mapped) but "
        f"only {_gib(available)} is free; free memory or merge in a smaller dtype (dtype: bfloat16)")


@dataclass(frozen=True)
class Need:
    """One part of what a merge holds, as :func:`check_fits` names it: ``label`` and ``nbytes``; ``device``: held on
    the compute device (a GPU's memory when the merge runs there), else in CPU memory."""

    label: str
    nbytes: int
    device: bool = False


def check_fits(needs: Sequence[Need], *, what: str, fixes: str, available: int,
               device_available: int | None = None) -> None:
    """Refuse ``what`` before it starts unless its parts fit: those in CPU memory within ``HEADROOM`` of
    ``available``, those on the compute device within ``HEADROOM`` of ``device_available`` (None: the compute device
    is the CPU, every part counts there). :class:`MemoryPlanError`, one line: each part, their sum, the free memory
    and ``fixes``."""
    split = device_available is not None
    cpu = sum(n.nbytes for n in needs if not (split and n.device))
    device = sum(n.nbytes for n in needs if split and n.device)
    if cpu <= HEADROOM * available and (device_available is None or device <= HEADROOM * device_available):
        return
    free = format_size(available) + ("" if device_available is None
                                     else f" (compute device {format_size(device_available)})")
    parts = " + ".join(f"{n.label} {format_size(n.nbytes)}" for n in needs if n.nbytes)
    raise MemoryPlanError(f"not enough memory for {what}: {parts} = {format_size(sum(n.nbytes for n in needs))} "
                          f"needed within {HEADROOM:.0%} of the free {free}; {fixes}")


def check_stream_memory(*, shard: int, working_set: int, available: int, working_available: int | None = None,
                        what: str) -> None:
    """Refuse a streaming merge (:mod:`evomerge.engine.streaming`) that cannot fit, before any tensor is read: it
    holds one output shard (``shard`` bytes, CPU) and one tensor's ``working_set`` (:func:`stream_working_set_bytes`)
    on the compute device, CPU unless ``working_available`` gives the compute device's free bytes. The sources stay
    memory-mapped (page cache, which the kernel reclaims). :class:`MemoryPlanError` names the numbers and the fixes."""
    check_fits([Need("one output shard", shard), Need("the largest tensor's working set", working_set, device=True)],
               what=what, available=available, device_available=working_available,
               fixes="free memory, lower --max-shard-size, merge fewer sources at once, or use a method with a "
                     "smaller working set (linear / task_arithmetic)")


def layer_stack_bytes(checkpoints: Mapping[str, Checkpoint], layers: Sequence[tuple[str, int]], *,
                      itemsize: int | None = None) -> int:
    """Bytes of a layer stack (:mod:`evomerge.engine.stacking`) whose layers are ``layers`` (model, layer index):
    the first model's tensors outside the layers (the embeddings, final norm and head, of one shape in every model)
    and each layer's tensors, in their stored dtypes, or ``itemsize`` bytes per floating-point entry (the stack in
    another dtype)."""

    def nbytes(ck: Checkpoint, name: str) -> int:
        dtype = ck.dtype(name)
        return math.prod(ck.shape(name)) * (itemsize if itemsize and dtype.is_floating_point else dtype.itemsize)

    per_layer: dict[tuple[str, int], int] = {}
    for model in dict.fromkeys(m for m, _ in layers):
        ck = checkpoints[model]
        for name in ck.names:
            j = layer_index(name)
            if j is not None:
                per_layer[model, j] = per_layer.get((model, j), 0) + nbytes(ck, name)
    first = checkpoints[layers[0][0]] if layers else next(iter(checkpoints.values()))
    outside = sum(nbytes(first, n) for n in first.names if layer_index(n) is None)
    return outside + sum(per_layer.get(layer, 0) for layer in layers)
