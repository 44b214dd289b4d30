"""Model Stock: interpolate between the average of fine-tuned models and the base, by their angle."""

from __future__ import annotations

import torch
from torch import Tensor

_ZERO_NORM = 1e-12


def model_stock(
    base: Tensor | None,
    sources: Tensor,
    *,
    filter_wise: bool = False,
    seed: int | None = None,
    stats: Tensor | None = None,
) -> Tensor:
    """Model Stock: ``t · θ_avg + (1 − t) · θ0`` with ``t = N cos θ / (1 + (N − 1) cos θ)``.

    ``θ_avg = mean_i θ_i``; ``cos θ`` = mean over pairs ``i < j`` of the cosine between task vectors
    ``τ_i = θ_i − θ0``, computed over the whole tensor, or per output row (dim 0) when ``filter_wise`` and the
    tensor is at least 2-D. Guards: a pair with a ~0 task vector has cosine 0; ``cos θ`` is clamped to
    ``[0, 1]`` (anti-correlated task vectors give ``t = 0``, the base). So identical sources give ``t = 1``:
    that model; sources equal to the base give the base.
    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV.
    """
    if base is None:
        raise ValueError("model_stock needs a base model: the angle is measured between task vectors θ_i − θ0")
    n = sources.shape[0]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 sources to measure an angle, got {n}")
    rows = sources.shape[1] if filter_wise and sources.dim() >= 3 else 1
    tau = (sources - base).reshape(n, rows, -1)
    norms = torch.linalg.vector_norm(tau, dim=-1)  # [N, rows]
    pair_cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            denominator = norms[i] * norms[j]
            dot = (tau[i] * tau[j]).sum(-1)
            pair_cosines.append(torch.where(denominator > _ZERO_NORM, dot / denominator.clamp_min(_ZERO_NORM), 0.0))
    cosine = torch.stack(pair_cosines).mean(0).clamp(0.0, 1.0)
    ratio = n * cosine / (1 + (n - 1) * cosine)
    ratio = ratio.view(rows, *([1] * (base.dim() - 1))) if rows > 1 else ratio.view(())
    return ratio * sources.mean(0) + (1 - ratio) * base
