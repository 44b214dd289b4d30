"""Weighted averages of checkpoints (model soups) and of task vectors (task arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ZERO_WEIGHT_SUM = 1e-8


def per_source(values: Tensor, like: Tensor) -> Tensor:
    """Per-source parameters [N] as a float32 tensor on ``like``'s device, shaped to broadcast over [N, *S]."""
    return values.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


def source_sum(values: Tensor | Sequence[Tensor]) -> Tensor:
    """``((v_0 + v_1) + v_2) + …`` over the rows of ``values`` ([N, *S] or N tensors [*S]), in that order.

    Adds whole rows instead of a ``sum(0)`` reduction: the same rounding for every entry whatever the memory
    layout, several times faster on CPU for the small N of merges, and (with every later operation also on
    rows) compiled into one loop over the entries. One row is returned as is.
    """
    rows = list(values)
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    return total


def weighted_sum(values: Tensor | Sequence[Tensor], weight: Tensor, *, normalize: bool) -> Tensor:
    """``Σ_i w_i v_i`` over the rows of ``values`` ([N, *S] or N tensors); divided by ``Σ_i w_i`` when
    ``normalize``.

    If ``|Σ_i w_i| < 1e-8`` the sum is returned undivided (as mergekit does) instead of dividing by ~0;
    with all weights zero that is a zero tensor. Recipe validation keeps weights in range before this point.
    """
    rows = list(values)
    w = weight.to(device=rows[0].device, dtype=torch.float32)
    total = source_sum([w[i] * row for i, row in enumerate(rows)])
    if not normalize:
        return total
    weight_sum = source_sum(w)  # in source order, like the rows (a reduction kernel may associate differently)
    return total / torch.where(weight_sum.abs() < _ZERO_WEIGHT_SUM, torch.ones_like(weight_sum), weight_sum)


def linear(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    normalize: bool = True,
) -> Tensor:
    """Linear merge / model soup: ``Σ_i w_i θ_i / Σ_i w_i`` (``normalize``), else ``Σ_i w_i θ_i``.

    A uniform soup is equal weights. ``base`` is ignored (a base model is just another ingredient here).
    Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
    without increasing inference time", ICML.
    """
    return weighted_sum(sources, weight, normalize=normalize)


def task_arithmetic(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    lam: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """Task arithmetic: ``θ0 + λ Σ_i w_i τ_i`` with task vectors ``τ_i = θ_i − θ0``.

    Negative ``w_i`` subtract a task ("forgetting via negation"). With ``normalize`` the sum is divided by
    ``Σ_i w_i`` (see :func:`weighted_sum` for ``Σ w = 0``).
    Ilharco et al. 2023, "Editing models with task arithmetic", ICLR.
    """
    if base is None:
        raise ValueError("task_arithmetic needs a base model: task vectors are θ_i − θ_base")
    return base + weighted_sum(sources - base, weight, normalize=normalize) * lam  # multiply, then add (see ties.py)
