"""Entrywise merge kernels: upcast, the method's formula and the cast into the live tensor as one step, run
compiled (``torch.compile`` with eager numerics) or eagerly in cache-sized chunks -- both bit-identical to the
plain formula on the whole tensor, because the formula is entrywise.

What a kernel reads besides base and sources (:class:`KernelInputs`): per-entry inputs (stored DARE draws, DELLA
ranks), per-block tables (thresholds of every tensor of a run, one column per ``ALIGN`` entries), or the keys of
counter-based draws computed inside the kernel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evomerge.engine.layout import ALIGN
from evomerge.methods.counter_rng import uniform

__all__ = ["CPU_CHUNK", "COMPILE_MIN_ENTRIES", "KernelInputs", "Kernels", "draw_into", "fused_merge", "value_range"]

log = logging.getLogger(__name__)

CPU_CHUNK = 1 << 18  # entries merged at a time on CPU: the fp32 temporaries of one chunk stay in the caches
# torch.compile takes seconds per method; below this many entries the eager merge is faster than that
COMPILE_MIN_ENTRIES = 1 << 24

# Inductor options that keep compiled arithmetic bit-identical to eager: no fused multiply-add contraction, IEEE
# division (Triton's default x / y is approximate).
_EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True}


@dataclass
class KernelInputs:
    """What a merge kernel reads besides base and sources, by how it is sliced into chunks of entries.

    ``entries``: keyword arguments with one value per entry ([N, entries], e.g. stored DARE draws); ``blocks``: one
    value per block of ``ALIGN`` entries ([N, blocks] tables, e.g. the thresholds of every tensor of a run), given
    to ``fn`` expanded per entry (:func:`per_entry`); ``keys``: a stochastic method's
    :func:`~evomerge.methods.counter_rng.row_keys` [N, 2] when its draws are not stored: ``fn`` gets ``noise``
    computed in the kernel for entries ``start ..`` of the tensor.
    """

    entries: dict[str, Tensor] = field(default_factory=dict)
    blocks: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    keys: Tensor | None = None
    start: int = 0

    def chunk(self, begin: int, end: int) -> KernelInputs:
        """The inputs of entries ``[begin, end)`` (``begin`` a multiple of ``ALIGN``)."""
        return KernelInputs(
            {key: t[:, begin:end] for key, t in self.entries.items()},
            {key: tuple(t[:, begin // ALIGN : -(-end // ALIGN)] for t in tables)
             for key, tables in self.blocks.items()},
            self.keys, self.start + begin)


def draws(keys: Tensor, start: int, size: int, device: torch.device) -> Tensor:
    """The counter-based draws [N, size] of entries ``start .. start + size`` of a tensor with ``keys``."""
    return uniform(keys, torch.arange(size, device=device) + start)


def draw_into(out: Tensor, keys: Tensor, start: int = 0) -> None:
    """``out`` [N, M] ← :func:`draws` of entries ``start .. start + M``."""
    out.copy_(draws(keys, start, out.shape[1], out.device))


def per_entry(table: Tensor, entries: int) -> Tensor:
    """[N, blocks] values per block of ``ALIGN`` entries as [N, entries] (an indexing expression when compiled)."""
    return table.unsqueeze(-1).expand(*table.shape, ALIGN).reshape(table.shape[0], -1)[:, :entries]


def fused_merge(
    fn: Callable[..., Tensor], out: Tensor, rows: Tensor, base_row: Tensor | None, kwargs: Mapping[str, object],
    inputs: KernelInputs,
) -> None:
    """``out ← fn(base, sources)`` with the upcast to fp32 and the cast into ``out`` in the same graph (compiled,
    one kernel for entrywise methods)."""
    size = rows.shape[1]
    extra: dict[str, object] = dict(inputs.entries)
    extra.update({key: tuple(per_entry(table, size) for table in tables) for key, tables in inputs.blocks.items()})
    if inputs.keys is not None:
        extra["noise"] = draws(inputs.keys, inputs.start, size, rows.device)
    merged = fn(None if base_row is None else base_row.float(), rows.float(), **kwargs, **extra)
    out.copy_(merged)


def value_range(stored: Tensor) -> Tensor:
    """``[min, max]`` of the stored entries of a merge: both finite iff every entry is (NaN propagates into both,
    ``±inf`` shows in one). Taken on the stored dtype, it also catches fp32 values that overflow a bf16/fp16 model.
    One cheap pass after the merge kernel, not inside it: compiled on CPU, a reduction fused into the merge kernel
    slows the kernel down several times."""
    return torch.stack(torch.aminmax(stored.reshape(-1)))


class Kernels:
    """Runs entrywise kernels on one device: compiled once per name (a method, or ``"draws"``), else eagerly.

    ``compile``: True / False forces ``torch.compile`` on / off; None (default) reads ``EVOMERGE_COMPILE``
    (``1`` / ``0``) and, unset, compiles for models of at least ``compile_min_entries`` entries (where it pays
    for its compile time). ``chunk_entries``: entries per eager step on CPU (their fp32 temporaries stay in cache).
    """

    def __init__(self, device: torch.device, total_entries: int, *, compile: bool | None = None,
                 compile_min_entries: int = COMPILE_MIN_ENTRIES, chunk_entries: int = CPU_CHUNK) -> None:
        if chunk_entries < 1 or chunk_entries % ALIGN:
            raise ValueError(f"chunk_entries must be a positive multiple of {ALIGN}, got {chunk_entries}")
        self.device = device
        self.chunk_entries = chunk_entries
        if compile is None:
            setting = os.environ.get("EVOMERGE_COMPILE")
            compile = total_entries >= compile_min_entries if setting is None else setting != "0"
        self.compile = compile
        self._compiled: dict[str, Callable[..., None] | None] = {}

    def is_compiled(self, name: str) -> bool:
        """Whether kernel ``name`` ran compiled (False when eager: disabled, not run yet, or its compile failed)."""
        return self._compiled.get(name) is not None

    def _compiled_fn(self, name: str, fn: Callable[..., None]) -> Callable[..., None] | None:
        if name not in self._compiled:
            if self.compile:
                # one graph per method and flag combination; the default limit (8 per function) is too low
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled[name] = torch.compile(
                fn, dynamic=True, fullgraph=True, options=_EAGER_NUMERICS) if self.compile else None
        return self._compiled[name]

    def run(self, name: str, fn: Callable[..., None], size: int,
            call: Callable[[int, int, Callable[..., None]], None]) -> None:
        """Run an entrywise kernel over ``size`` entries: ``call(begin, end, f)`` applies ``f`` (``fn`` or its
        compiled form) to entries ``[begin, end)``. Compiled: once over all entries, falling back to eager for good
        when compiling fails; eager on CPU: in chunks of ``chunk_entries`` entries, each upcast, computed and cast
        while its fp32 temporaries are in cache (entrywise: identical to one call)."""
        compiled = self._compiled_fn(name, fn)
        if compiled is not None:
            try:
                call(0, size, compiled)
                return
            except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to the eager formula
                log.warning("torch.compile of the %s kernel failed (%s); running it eagerly", name, error)
                self._compiled[name] = None
        step = self.chunk_entries if self.device.type == "cpu" else max(size, 1)
        for begin in range(0, size, step):
            call(begin, min(begin + step, size), fn)
