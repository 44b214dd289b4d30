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
(:func:`stream_working_set_bytes`); :func:`check_stream_memory` refuses it the same way. Free memory on CPU is the
smaller of the machine's available memory and what the process's cgroup (v1 or v2) still allows, reclaimable page
cache counted as free.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.methods.spec import MergeMethod
from evomerge.outdir import format_size
from evomerge.recipe import RecipeError

__all__ = ["MemoryPlan", "MemoryPlanError", "RANK_BYTES", "SELECT_BYTES", "SORT_BYTES", "available_bytes",
           "check_stream_memory", "plan_memory", "rank_bytes", "stream_working_set_bytes", "working_set_bytes"]

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

    @property
    def resident_need(self) -> int:
        return 2 * self.live_model + self.source_bytes + self.working_set

    @property
    def mapped_need(self) -> int:
        # the live model twice: binding its merged tensors into one flat buffer holds both copies for a moment
        return 2 * self.live_model + self.working_set


def plan_memory(*, live_model: int, source_bytes: int, working_set: int, n_models: int, available: int
                ) -> MemoryPlan:
    """Choose ``resident`` when live model + sources + working set fit ``HEADROOM`` of ``available``, else
    ``mapped`` when the live model + working set fit (safetensors files are memory-mapped by their reader, pickle
    checkpoints by ``torch.load(weights_only=True, mmap=True)``); else
    :class:`MemoryPlanError` naming every number and what to change. ``working_set``: :func:`working_set_bytes`."""
    working = working_set
    plan = MemoryPlan("resident", live_model, source_bytes, working, available)
    budget = HEADROOM * available
    if plan.resident_need <= budget:
        return plan
    if plan.mapped_need <= budget:
        log.warning("the %d models need %s resident but %s is free: their tensors stay memory-mapped in the "
                    "safetensors files and are read per tensor (slower per candidate, same bits)",
                    n_models, _gib(plan.resident_need), _gib(available))
        return MemoryPlan("mapped", live_model, source_bytes, working, available)
    raise MemoryPlanError(
        f"not enough memory: the live model and one tensor's working set need {_gib(plan.mapped_need)} (live model "
        f"{_gib(live_model)}, working set {_gib(working)}; the sources' {_gib(source_bytes)} stay memory-mapped) but "
        f"only {_gib(available)} is free; free memory or merge in a smaller dtype (dtype: bfloat16)")


def check_stream_memory(*, shard: int, working_set: int, available: int, working_available: int | None = None,
                        what: str) -> None:
    """Refuse a streaming merge (:mod:`evomerge.engine.streaming`) that cannot fit, before any tensor is read: it
    holds one output shard (``shard`` bytes, CPU) and one tensor's ``working_set`` (:func:`stream_working_set_bytes`)
    on the compute device, CPU unless ``working_available`` gives the compute device's free bytes. The sources stay
    memory-mapped (page cache, which the kernel reclaims). :class:`MemoryPlanError` names the numbers and the fixes."""
    on_cpu = shard + (working_set if working_available is None else 0)
    fits_cpu = on_cpu <= HEADROOM * available
    fits_device = working_available is None or working_set <= HEADROOM * working_available
    if fits_cpu and fits_device:
        return
    free = format_size(available) + ("" if working_available is None
                                     else f" (compute device {format_size(working_available)})")
    raise MemoryPlanError(
        f"not enough memory for {what}: one output shard {format_size(shard)} + the largest tensor's working set "
        f"{format_size(working_set)} = {format_size(shard + working_set)} needed within {HEADROOM:.0%} of the free "
        f"{free}; free memory, lower --max-shard-size, merge fewer sources at once, or use a method with a smaller "
        "working set (linear / task_arithmetic)")
