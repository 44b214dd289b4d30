"""What the engine keeps across candidates: inputs of a merge that depend on the models (or the seed) only.

- magnitude thresholds per (tensor, base, sources, keep counts) -- TIES / breadcrumbs;
- each task vector's sorted magnitudes (CPU): any new density is then a lookup (:class:`SortedMagnitudes`);
- DELLA's relative magnitude ranks per (tensor, base, sources);
- the Gram matrices of the angle-based merges per (method, tensor, base, sources, flags);
- the counter-based DARE / DELLA draws of one seed, laid out like the sources (the noise store);
- per-source parameter tensors on the compute device, by value.

Memory is bounded by two :class:`Budget` objects of one kind: the draws may take ``draws_budget`` bytes, the sorted
magnitudes and ranks together ``kept_budget`` bytes; what does not fit is recomputed per candidate (slower, same
bits). The small tables (thresholds, Gram matrices, device parameters) are FIFO caches of bounded length.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from evomerge.engine.kernels import Kernels, draw_into
from evomerge.engine.layout import SourceStacks
from evomerge.methods import MergeMethod
from evomerge.methods.counter_rng import row_keys
from evomerge.methods.select import SortedMagnitudes
from evomerge.methods.sparsify import kth_magnitudes, relative_ranks
from evomerge.methods.spec import Coefficients, Ranks, Thresholds

__all__ = ["CACHE_ENTRIES", "DRAWS_SHARE", "KEPT_SHARE", "Budget", "KeptInputs", "tensor_seed"]

CACHE_ENTRIES = 1 << 16  # bound of the threshold, Gram and device-parameter caches (entries; each a few bytes)
DRAWS_SHARE = 0.25  # default share of the memory free after loading that stored DARE draws may take
KEPT_SHARE = 0.25  # ... and that sorted magnitudes and ranks may take together


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the recipe seed and the tensor name (stable across runs and processes)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _bounded_put(cache: dict, key: object, value: object) -> None:
    """Insert into a dict used as a FIFO cache of at most ``CACHE_ENTRIES`` entries."""
    if len(cache) >= CACHE_ENTRIES:
        del cache[next(iter(cache))]
    cache[key] = value


class Budget:
    """A memory limit for kept inputs: ``limit`` bytes, ``used`` of them taken; thread-safe (the prefetch threads
    reserve from it). Lowering ``limit`` keeps what is held and refuses what no longer fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` (negative: an estimate corrected down); False, taking nothing, when a positive amount
        does not fit."""
        with self._lock:
            if nbytes > 0 and self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken earlier."""
        with self._lock:
            self.used -= nbytes


class KeptInputs:
    """The inputs a merge reads besides base and sources, computed once and kept within their budgets."""

    def __init__(self, stacks: SourceStacks, kernels: Kernels, *, draws_budget: int, kept_budget: int) -> None:
        self.stacks, self.kernels, self.device = stacks, kernels, stacks.device
        self.draws_budget = Budget(draws_budget)
        self.kept_budget = Budget(kept_budget)
        self._thresholds: dict[tuple, Tensor] = {}
        self._gram: dict[tuple, Tensor] = {}
        self._device_params: dict[tuple, Tensor] = {}
        self._noise: dict[tuple[int, int], tuple[Tensor, set[str]]] = {}
        self._sorted: dict[tuple[str, int, int], SortedMagnitudes] = {}
        self._ranks: dict[tuple[str, int, tuple[int, ...]], Tensor] = {}

    # ----------------------------------------------------------------------------------------- accounting
    def cache_bytes(self) -> dict[str, int]:
        """Bytes held per kind of kept input."""
        return {
            "draws": sum(buffer.nbytes for buffer, _ in self._noise.values()),
            "sorted_magnitudes": sum(entry.nbytes for entry in self._sorted.values()),
            "ranks": sum(t.nbytes for t in self._ranks.values()),
            "gram": sum(t.nbytes for t in self._gram.values()),
            "thresholds": sum(t.nbytes for t in self._thresholds.values()),
        }

    def counts(self) -> dict[str, int]:
        """How many entries of each kind are kept: thresholds and Gram matrices per tensor (and keep counts / flags),
        sorted magnitudes per (tensor, source), ranks per tensor, draws per tensor of the stored seed."""
        return {
            "draws": sum(len(drawn) for _, drawn in self._noise.values()),
            "sorted_magnitudes": len(self._sorted),
            "ranks": len(self._ranks),
            "gram": len(self._gram),
            "thresholds": len(self._thresholds),
        }

    def clear(self) -> None:
        """Drop every kept input (their budgets are given back); recomputed when needed."""
        held = self.cache_bytes()
        self.kept_budget.release(held["sorted_magnitudes"] + held["ranks"])
        self.draws_budget.release(held["draws"])
        for cache in (self._noise, self._sorted, self._ranks, self._gram, self._thresholds):
            cache.clear()

    # ------------------------------------------------------------------------------------ parameters
    def on_device(self, kwargs: Mapping[str, object]) -> dict[str, object]:
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

    # ------------------------------------------------------------------------------------ thresholds
    def thresholds(
        self, need: Thresholds, name: str, base: int | None, sources: list[int], host: Mapping[str, object]
    ) -> tuple[Tensor, ...]:
        """Exact magnitude thresholds [N] of ``need.counts`` for tensor ``name``, kept per (tensor, base,
        sources, keep counts): they depend on nothing else, so candidates that keep the counts reuse them. New
        counts are looked up in the sorted magnitudes of each task vector (CPU, when they fit their budget: a
        search over densities then sorts each task vector once), else found by :func:`kth_magnitudes` one task
        vector at a time (the k-th largest of a row does not depend on the others; one row's selection is the
        working set :data:`~evomerge.engine.memory.SELECT_BYTES` counts, whatever the number of sources)."""
        numel = self.stacks.spans[name].numel
        thresholds = []
        for counts in need.counts(host, numel):
            key = (name, base, tuple(sources), tuple(counts.tolist()))
            if key not in self._thresholds:
                sorted_rows = self.sorted_rows(name, base, sources)  # type: ignore[arg-type]
                if sorted_rows is not None:
                    found = [row.kth_largest(k) if k > 0 else math.nan for row, k in zip(sorted_rows, counts.tolist())]
                    value = torch.tensor(found, dtype=torch.float32, device=self.device)
                else:
                    value = torch.cat([kth_magnitudes(self.stacks.task_vectors(name, base, [i]), counts[j : j + 1])
                                       for j, i in enumerate(sources)])  # type: ignore[arg-type]
                _bounded_put(self._thresholds, key, value)
            thresholds.append(self._thresholds[key])
        return tuple(thresholds)

    def threshold_tables(
        self, need: Thresholds, run: list[str], base: int | None, sources: list[int], host: Mapping[str, object]
    ) -> tuple[Tensor, ...]:
        """Per fraction, the thresholds of every tensor of ``run`` as an [N, blocks] table: one column per block of
        ``ALIGN`` entries (tensors start on block boundaries, so every block belongs to one tensor)."""
        per_tensor = [self.thresholds(need, name, base, sources, host) for name in run]
        spans = self.stacks.spans
        if len(run) == 1:
            return tuple(t.view(-1, 1).expand(-1, spans[run[0]].blocks) for t in per_tensor[0])
        blocks = torch.tensor([spans[n].blocks for n in run], device=self.device)
        total = int(sum(spans[n].blocks for n in run))
        return tuple(
            torch.repeat_interleave(torch.stack(column, dim=1), blocks, dim=1, output_size=total)
            for column in zip(*per_tensor)
        )

    def sorted_rows(self, name: str, base: int, sources: list[int]) -> list[SortedMagnitudes] | None:
        """The sorted magnitudes of ``τ_i = source_i − base`` for tensor ``name``, each sorted once per (tensor,
        base, source) and kept; None when the missing ones do not fit the budget (always on CUDA, where
        ``torch.topk`` is fast)."""
        missing = [i for i in dict.fromkeys(sources) if (name, base, i) not in self._sorted]
        estimate = len(missing) * self.stacks.spans[name].numel * 2
        if self.device.type != "cpu" or not self.kept_budget.reserve(estimate):
            return None
        for i in missing:
            built = SortedMagnitudes.build(self.stacks.task_vectors(name, base, [i]).abs_())
            self._sorted[(name, base, i)] = built
            self.kept_budget.reserve(built.nbytes - built.numel * 2)  # the run-length table beyond the estimate
        return [self._sorted[(name, base, i)] for i in sources]

    # ------------------------------------------------------------------------------------------ ranks
    def relative_ranks(self, name: str, base: int, sources: list[int]) -> Tensor | None:
        """:func:`relative_ranks` of the task vectors of ``sources`` for tensor ``name`` as [N, numel] on the compute
        device, computed once per (tensor, base, sources) and kept; None when they do not fit the budget."""
        key = (name, base, tuple(sources))
        if key not in self._ranks:
            if not self.kept_budget.reserve(len(sources) * self.stacks.spans[name].numel * 4):
                return None
            self._ranks[key] = relative_ranks(self.stacks.task_vectors(name, base, sources))
        return self._ranks[key]

    def prefetch(self, method: MergeMethod, names: list[str], base: int | None, sources: list[int]) -> None:
        """Before a candidate's merges, compute the per-task-vector facts its tensors miss (sorted magnitudes for
        CPU thresholds, DELLA's ranks) in ``torch.get_num_threads()`` threads, a tensor per job: their numpy sorts
        release the GIL. Nothing to do (no job, no thread pool) once they are kept; whatever does not fit the
        budget is left to the per-candidate path."""
        if base is None:
            return
        jobs: list[Callable[[], object]] = []
        if method.needs(Thresholds) is not None and self.device.type == "cpu":
            jobs += [lambda name=name: self.sorted_rows(name, base, sources) for name in names
                     if any((name, base, i) not in self._sorted for i in sources)]
        if method.needs(Ranks) is not None:
            jobs += [lambda name=name: self.relative_ranks(name, base, sources) for name in names
                     if (name, base, tuple(sources)) not in self._ranks]
        workers = min(len(jobs), torch.get_num_threads())
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="evomerge-prefetch") as pool:
                list(pool.map(lambda job: job(), jobs))

    # ------------------------------------------------------------------------------------ angle-based
    def coefficients(
        self, method: MergeMethod, need: Coefficients, name: str, base: int | None, sources: list[int],
        kwargs: Mapping[str, object],
    ) -> Tensor:
        """An angle-based method's combination for tensor ``name`` (``need.combine`` of its Gram matrices,
        which are computed once per (method, tensor, base, sources, flags) and kept), on the compute device."""
        flags = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool)))
        key = (method.name, name, base, tuple(sources), flags)
        if key not in self._gram:
            base_t, src = self.stacks.fp32(name, base, sources)
            _bounded_put(self._gram, key, need.gram(base_t, src, kwargs))
        return need.combine(self._gram[key], kwargs).to(self.device, torch.float32)

    # ------------------------------------------------------------------------------------------ draws
    def noise_store(self, seed: int, n_sources: int) -> tuple[Tensor, set[str]] | None:
        """Flat [N, entries] buffer of the uniform draws of ``seed`` (laid out like the sources) and the tensors
        drawn into it so far; None when it does not fit the draws budget. Stores of other seeds are dropped first (a
        search keeps one seed); a dropped buffer of the same size is reused (no new pages to fault in)."""
        key = (seed, n_sources)
        if key not in self._noise:
            reuse = None
            for other in [k for k in self._noise if k != key]:
                buffer, _ = self._noise.pop(other)
                self.draws_budget.release(buffer.nbytes)
                reuse = buffer if other[1] == n_sources else None
            if not self.draws_budget.reserve(n_sources * self.stacks.total * 4):
                return None
            if reuse is None:
                reuse = torch.empty(n_sources, self.stacks.total, dtype=torch.float32, device=self.device)
            self._noise[key] = (reuse, set())
        return self._noise[key]

    def noise(self, run: list[str], seed: int, n_sources: int) -> Tensor:
        """The stored uniform draws of the tensors of ``run`` as [N, run entries] (tensors not drawn yet for
        ``seed`` are drawn into the store first: :func:`draw_into`, one fused hash kernel when compiled). Reading
        the store is cheaper than hashing again in the merge kernel on CPU."""
        buffer, drawn = self.noise_store(seed, n_sources)  # type: ignore[misc]
        for name in run:
            if name not in drawn:
                span = self.stacks.spans[name]
                target = buffer[:, span.offset : span.end]
                keys = row_keys(tensor_seed(seed, name), n_sources).to(self.device, non_blocking=True)
                self.kernels.run("draws", draw_into, span.numel,
                                 lambda begin, end, f, target=target, keys=keys: f(target[:, begin:end], keys, begin))
                drawn.add(name)
        begin, end = self.stacks.extent(run)
        return buffer[:, begin:end]
