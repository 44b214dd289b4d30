"""Sources that are LoRA adapters, kept as their low-rank factors: N adapters of rank r cost N·r·(d_in + d_out)
entries per target module, not N full models.

:class:`LowRankStacks` is the kind of :class:`~evomerge.engine.layout.SourceStacks` the engine uses when some of its
models are adapters (:mod:`evomerge.adapters`): the full models (the base first) are held as before (resident or
memory-mapped); an adapter's tensor is formed when a merge reads it -- ``W + ΔW`` from the base row on a target
module (:func:`~evomerge.adapters.adapter_source`, rounded to the base tensor's dtype, as the checkpoint PEFT's
``merge_and_unload`` saves holds it), its saved tensor where it replaces one, the base row elsewhere -- so every
merge method applies unchanged to the task vectors ``τ_i = source_i − base``, and the engine (which merges only
tensors whose parameters changed) forms the dense products only for the tensors it merges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.adapters import AdapterCheckpoint, LoraFactors, adapted_tensor
from evomerge.checkpoint import Checkpoint
from evomerge.engine.layout import SourceStacks

__all__ = ["LowRankStacks", "has_adapters", "stack_bytes"]


def has_adapters(checkpoints: Sequence[Checkpoint | AdapterCheckpoint]) -> bool:
    return any(isinstance(ck, AdapterCheckpoint) for ck in checkpoints)


def stack_bytes(checkpoints: Sequence[Checkpoint | AdapterCheckpoint], names: Sequence[str], itemsize: int) -> int:
    """Bytes the sources take once loaded: a full model's merged tensors in the common dtype (``itemsize``), an
    adapter's stored factors and replaced tensors."""
    full = sum(math.prod(checkpoints[0].shape(n)) for n in names) * itemsize
    return sum(ck.adapter.total_bytes if isinstance(ck, AdapterCheckpoint) else full for ck in checkpoints)


class LowRankStacks(SourceStacks):
    """Full models as in :class:`SourceStacks` (the first one is the adapters' base), adapters as factors on the
    storage device; model indices are the engine's (full models and adapters in the order given)."""

    def __init__(self, checkpoints: Sequence[Checkpoint | AdapterCheckpoint], paths: Sequence[str],
                 names: Sequence[str], storage: torch.device, device: torch.device, *, mapped: bool = False) -> None:
        full = [i for i, ck in enumerate(checkpoints) if not isinstance(ck, AdapterCheckpoint)]
        super().__init__([checkpoints[i] for i in full], [paths[i] for i in full], names, storage, device,
                         mapped=mapped)
        self._row = {i: r for r, i in enumerate(full)}  # engine model index -> row of the full models
        self._base_dtypes = {n: checkpoints[0].dtype(n) for n in names}
        self._factors: dict[int, dict[str, LoraFactors]] = {}
        self._replaced: dict[int, dict[str, Tensor]] = {}
        for i, ck in enumerate(checkpoints):
            if isinstance(ck, AdapterCheckpoint):
                self._factors[i] = {n: f.to(storage) for n, f in ck.adapter.factors.items() if n in self.spans}
                self._replaced[i] = {n: t.to(storage) for n, t in ck.adapter.replaced.items() if n in self.spans}
        self.n_models = len(checkpoints)

    def _adapter_tensor(self, i: int, name: str, base: Tensor) -> Tensor:
        """Adapter ``i``'s tensor ``name`` in the common dtype, from the base's (``base``, in that dtype)."""
        factors, saved = self._factors[i].get(name), self._replaced[i].get(name)
        if factors is None and saved is None:
            return base
        return adapted_tensor(base, factors, saved, self._base_dtypes[name]).to(self.dtype)

    def _select(self, name: str, idx: list[int]) -> Tensor:
        rows = [self._row.get(i) for i in idx]
        if all(r is not None for r in rows):
            return super()._select(name, rows)  # type: ignore[arg-type]
        base = super()._select(name, [0])[0]
        return torch.stack([super()._select(name, [r])[0] if r is not None else self._adapter_tensor(i, name, base)
                            for i, r in zip(idx, rows)])

    def run_rows(self, run: Sequence[str], idx: list[int]) -> Tensor:
        """As :meth:`SourceStacks.run_rows`; an adapter's rows are the base's entries of the run with its formed
        tensors written over their spans."""
        rows = [self._row.get(i) for i in idx]
        if all(r is not None for r in rows):
            return super().run_rows(run, rows)  # type: ignore[arg-type]
        if len(run) == 1:
            return self._select(run[0], idx).view(len(idx), -1).to(self.device, non_blocking=True)
        if self.flat is None:
            raise ValueError("memory-mapped sources are merged one tensor at a time")
        begin, end = self.extent(run)
        out = torch.empty(len(idx), end - begin, dtype=self.dtype, device=self.flat.device)
        for j, (i, r) in enumerate(zip(idx, rows)):
            out[j].copy_(self.flat[0 if r is None else r, begin:end])
            if r is None:
                for name in run:
                    if name in self._factors[i] or name in self._replaced[i]:
                        span = self.spans[name]
                        view = out[j, span.offset - begin : span.end - begin].view(span.shape)
                        view.copy_(self._adapter_tensor(i, name, view.clone()))
        return out.to(self.device, non_blocking=True)
