"""LoRA compositions that stay low-rank: LoraHub's factor sums and the exact rank sum.

LoraHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", Eq. 2 and
``lorahub/algorithm.py``) composes N adapters of one rank with weights ``w_i`` factor by factor:
``A = Σ_i w_i A_i``, ``B = Σ_i w_i B_i``, so ``ΔW = B A = Σ_i Σ_j w_i w_j B_i A_j`` -- *not* the weighted sum of
the adapters' updates (cross terms ``B_i A_j``; weights act quadratically). The paper's adapters share r and
lora_alpha, so the scale ``s`` is applied once after; with different scales each adapter's ``sqrt(s_i)`` is folded
into both of its factors (``ΔW_i = (sqrt(s_i) B_i)(sqrt(s_i) A_i)``), which is the paper's rule when they are equal.

The exact alternative is the rank sum (PEFT's ``add_weighted_adapter(combination_type="cat")``):
``A = [w_1 s_1 A_1; …; w_N s_N A_N]`` (stacked rows), ``B = [B_1 … B_N]`` (stacked columns), so
``ΔW = B A = Σ_i w_i s_i B_i A_i`` exactly, at rank ``Σ_i r_i``.

Each module's factors come as ``(A [r, d_in], B [d_out, r], s)``; ``None`` for a source that does not adapt the
module (it contributes nothing). ``transpose``: the weight is stored [d_in, d_out] (``Conv1D``, embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Factors", "compose_factors", "lorahub", "rank_sum", "svd_factors"]

Factors = tuple[Tensor, Tensor, float]  # (A [r, d_in], B [d_out, r], scale)


def compose_factors(factors: Sequence[Factors | None], weight: Tensor) -> tuple[Tensor, Tensor]:
    """LoraHub's composition ``(A, B) = (Σ_i w_i sqrt(s_i) A_i, Σ_i w_i sqrt(s_i) B_i)`` (fp32) over the sources that
    adapt the module; every such source must have the same rank (the paper's setting)."""
    present = [(i, f) for i, f in enumerate(factors) if f is not None]
    ranks = {f[0].shape[0] for _, f in present}
    if len(ranks) != 1:
        raise ValueError(f"LoraHub's factor sums need adapters of one rank, got ranks {sorted(ranks)}; use "
                         "rank_sum: true (the exact Σ w_i s_i B_i A_i) for adapters of different ranks")
    w = weight.to(torch.float64).tolist()
    A = sum(float(w[i] * math.sqrt(s)) * a.float() for i, (a, _, s) in present)
    B = sum(float(w[i] * math.sqrt(s)) * b.float() for i, (_, b, s) in present)
    return A, B  # type: ignore[return-value]


def rank_sum(factors: Sequence[Factors | None], weight: Tensor) -> tuple[Tensor, Tensor]:
    """The exact composition ``A = [w_i s_i A_i]_i`` (rows), ``B = [B_i]_i`` (columns): ``B A = Σ_i w_i s_i B_i A_i``
    at rank ``Σ r_i`` (PEFT's ``cat``), fp32."""
    w = weight.to(torch.float64).tolist()
    present = [(i, f) for i, f in enumerate(factors) if f is not None]
    A = torch.cat([a.float() * w[i] * s for i, (a, _, s) in present], dim=0)
    B = torch.cat([b.float() for _, (_, b, _) in present], dim=1)
    return A, B


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of ``delta`` [d_out, d_in] (Eckart-Young): ``B = U_k diag(S_k)``,
    ``A = Vh_k`` from ``torch.linalg.svd`` (PEFT's ``svd`` combinations truncate the same way)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return Vh[:rank], U[:, :rank] @ torch.diag(S[:rank])


def lorahub(base: Tensor, factors: Sequence[Factors | None], *, weight: Tensor, rank_sum: bool = False,
            transpose: bool = False) -> Tensor:
    """``W + ΔW`` (fp32) for one module: ``ΔW = B A`` of :func:`compose_factors` (LoraHub's factor sums, the
    default) or of :func:`rank_sum` (exact, ``rank_sum=True``); transposed when the weight is stored [d_in, d_out].
    ``W`` alone where no source adapts the module."""
    if all(f is None for f in factors):
        return base.float()
    factors = [None if f is None else (f[0].to(base.device), f[1].to(base.device), f[2]) for f in factors]
    A, B = (_rank_sum(factors, weight) if rank_sum else compose_factors(factors, weight))
    product = B @ A
    return base.float() + (product.T if transpose else product)


_rank_sum = rank_sum  # the keyword argument of lorahub shadows the function's name
