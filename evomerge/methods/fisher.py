"""Fisher merging: per-entry weighted average with the diagonal Fisher information as weights."""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.methods.linear import per_source, weighted_sum


def fisher(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    fisher_floor: float = 1e-6,
    stats: Tensor | None = None,
) -> Tensor:
    """Fisher merge: ``Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i`` per entry, ``F̃_i = max(F_i, floor · mean(F))``.

    ``stats`` = diagonal Fishers ``F`` [N, *S] (:func:`evomerge.methods.statistics.fisher_diagonal`). The floor
    is relative: ``mean(F)`` is the mean over all sources and entries of this tensor, so it does not depend on
    the (loss- and model-dependent) scale of the Fisher. Where every ``F_i`` is ~0 the floor makes the entry
    the weighted mean ``Σ w_i θ_i / Σ w_i``; a tensor with no Fisher at all (all zero, or ``stats=None``, e.g. a
    buffer) is the weighted mean. ``base`` is unused.
    Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS.
    """
    mean = weighted_sum(sources, weight, normalize=True)
    if stats is None:
        return mean
    if stats.shape != sources.shape:
        raise ValueError(
            f"fisher: stats must hold one diagonal Fisher per source with the sources' shape {tuple(sources.shape)},"
            f" got {tuple(stats.shape)}"
        )
    fisher_values = stats.to(device=sources.device, dtype=torch.float32)
    floored = torch.maximum(fisher_values, fisher_floor * fisher_values.mean())
    importance = per_source(weight, sources) * floored
    denominator = importance.sum(0)
    numerator = (importance * sources).sum(0)
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), mean)
