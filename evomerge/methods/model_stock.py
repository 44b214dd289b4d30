"""Model Stock: interpolate between the average of fine-tuned models and the base, by their angle.

Computed as mergekit computes it (``mergekit/merge_methods/model_stock.py``), operation for operation in float32, so
an fp32 merge on CPU gives mergekit's bits: task-vector norms and dot products reduced by torch in float32, cosines
``dot / max(|a||b|, 1e-6)`` clamped to ``[-1, 1]``, their mean over pairs, ``t = N cos / (1 + (N − 1) cos)`` (0 where
``|1 + (N − 1) cos| < 1e-6``), then ``t · (Σ θ_i / N) + (1 − t) · θ0``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from evomerge.methods.linear import source_sum

_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


def _require_base(base: Tensor | None) -> None:
    if base is None:
        raise ValueError("model_stock needs a base model: the angle is measured between task vectors θ_i − θ0")


def _rows(sources: Tensor, params: Mapping[str, object]) -> int:
    """One row for the whole tensor, or one per output row (dim 0) with ``filter_wise`` on a 2-D+ tensor."""
    return sources.shape[1] if params.get("filter_wise") and sources.dim() >= 3 else 1


def model_stock_gram(base: Tensor | None, sources: Tensor, params: Mapping[str, object]) -> Tensor:
    """Norms and dot products of the task vectors ``τ_i = θ_i − θ0`` per row, float32 values in a float64 CPU tensor
    [rows, N, N]: ``G[r, i, i] = |τ_i[r]|`` (the norm, not its square), ``G[r, i, j] = τ_i[r] · τ_j[r]`` (float32
    reductions, as mergekit's ``torch.norm`` and ``(a * b).sum(-1)``)."""
    _require_base(base)
    n, rows = sources.shape[0], _rows(sources, params)
    tau = (sources - base).reshape(n, rows, -1).float()
    stats = torch.zeros(rows, n, n, dtype=torch.float64)
    for i in range(n):
        stats[:, i, i] = torch.norm(tau[i], dim=-1).double().cpu()
        for j in range(i + 1, n):
            stats[:, i, j] = stats[:, j, i] = (tau[i] * tau[j]).sum(dim=-1).double().cpu()
    return stats


def model_stock_coefficients(gram: Tensor, params: Mapping[str, object]) -> Tensor:
    """``(t, 1 − t)`` per row of :func:`model_stock_gram` (float32 values, float64 [rows, 2]):
    ``t = N cos θ / (1 + (N − 1) cos θ)`` with ``cos θ`` the mean pair cosine (module docstring)."""
    stats = gram.float()
    n = stats.shape[1]
    cosines = [(stats[:, i, j] / (stats[:, i, i] * stats[:, j, j]).clamp(min=_NORM_FLOOR)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    cosine = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cosine
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, torch.zeros_like(cosine),
                    (n * cosine) / torch.where(singular, torch.ones_like(denominator), denominator))
    return torch.stack([t, 1 - t], dim=1).double()


def model_stock(
    base: Tensor | None,
    sources: Tensor,
    *,
    filter_wise: bool = False,
    coefficients: Tensor | None = None,
) -> Tensor:
    """Model Stock: ``t · θ_avg + (1 − t) · θ0`` with ``t = N cos θ / (1 + (N − 1) cos θ)``.

    ``θ_avg = (Σ_i θ_i) / N``; ``cos θ`` = mean over pairs ``i < j`` of the cosine between task vectors
    ``τ_i = θ_i − θ0``, computed over the whole tensor, or per output row (dim 0) when ``filter_wise`` and the
    tensor is at least 2-D. Guards (mergekit's): norm products below 1e-6 count as 1e-6, cosines are clamped to
    ``[-1, 1]``, and ``t = 0`` (the base) where ``1 + (N − 1) cos θ`` is within 1e-6 of 0. Identical sources give
    ``t = 1``: that model. ``coefficients``: :func:`model_stock_coefficients` of :func:`model_stock_gram`, computed
    beforehand (one row: then entrywise). Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned
    models", ECCV.
    """
    _require_base(base)
    n = sources.shape[0]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 sources to measure an angle, got {n}")
    if coefficients is None:
        params = {"filter_wise": filter_wise}
        coefficients = model_stock_coefficients(model_stock_gram(base, sources, params), params)
    c = coefficients.to(device=sources.device, dtype=torch.float32)
    rows = c.shape[0]
    t, keep = (c[:, 0], c[:, 1]) if rows == 1 else (c[:, :1], c[:, 1:])
    shape = (rows, -1) if rows > 1 else (-1,)
    average = (source_sum(sources) / n).reshape(shape)
    return (t * average + keep * base.reshape(shape)).reshape(base.shape)  # type: ignore[union-attr]
