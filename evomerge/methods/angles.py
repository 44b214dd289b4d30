"""Angle-based merges in two steps: Gram matrices of flattened tensors, then a weighted combination.

SLERP, multi-SLERP and Model Stock read every entry twice: once for the Gram matrix of the (task) vectors, which
depends on the models alone, and once to combine them with coefficients computed from it and the parameters.
The engine computes the Gram matrix once per tensor and sources (``Coefficients.gram``), the coefficients once per
candidate (``Coefficients.combine``), and runs :func:`combine`, which is entrywise, like a linear merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK = 1 << 20  # entries per vector accumulated at a time (bounds the float64 copy)


def gram_matrix(vectors: Tensor, rows: int = 1) -> Tensor:
    """``G[r, i, j] = Σ_m x_i[r, m] · x_j[r, m]`` in float64, on CPU: [rows, N, N].

    ``vectors`` [N, *S] is split into ``rows`` equal parts per vector (1: the whole tensor; ``S[0]``: one Gram
    matrix per output row). Products of float32 values are exact in float64, so the only rounding is the float64
    accumulation (in chunks of ``_CHUNK`` entries, one batched matmul each).
    """
    n = vectors.shape[0]
    parts = vectors.reshape(n, rows, -1).transpose(0, 1)  # [rows, N, L]
    gram = torch.zeros(rows, n, n, dtype=torch.float64, device=vectors.device)
    step = max(1, _CHUNK // rows)
    for begin in range(0, parts.shape[-1], step):
        block = parts[..., begin : begin + step].to(torch.float64)
        gram += block @ block.transpose(1, 2)
    return gram.cpu()


def combine(base: Tensor | None, sources: Tensor, coefficients: Tensor) -> Tensor:
    """``Σ_i a_i θ_i + b θ0`` over the sources [N, *S] (accumulated in source order, float32), ``b θ0`` only with a
    base. ``coefficients`` [rows, N + 1] holds ``(a_1 .. a_N, b)``: one row for the whole tensor (the formula is
    then entrywise), or one per output row (dim 0) of ``*S``.
    """
    n, rows = sources.shape[0], coefficients.shape[0]
    c = coefficients.to(device=sources.device, dtype=torch.float32)
    # [N + 1] scalars, or [N + 1, rows, 1, ...] broadcasting over each output row
    c = c.view(rows, n + 1, *([1] * (sources.dim() - 2))).movedim(1, 0) if rows > 1 else c[0]
    merged = sources[0] * c[0]
    for i in range(1, n):
        merged = merged + sources[i] * c[i]
    if base is not None:
        merged = merged + base * c[n]
    return merged
