"""Model Stock: interpolate between the average of fine-tuned models and the base, by their angle."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from evomerge.methods.angles import combine, gram_matrix

_ZERO_NORM = 1e-12


def _require_base(base: Tensor | None) -> None:
    if base is None:
        raise ValueError("model_stock needs a base model: the angle is measured between task vectors θ_i − θ0")


def model_stock_gram(base: Tensor | None, sources: Tensor, params: Mapping[str, object]) -> Tensor:
    """Gram matrices of the task vectors ``θ_i − θ0``: [1, N, N] for the whole tensor, or [rows, N, N] per output
    row when ``params["filter_wise"]`` and the tensor is at least 2-D."""
    _require_base(base)
    rows = sources.shape[1] if params.get("filter_wise") and sources.dim() >= 3 else 1
    return gram_matrix(sources - base, rows)


def model_stock_coefficients(gram: Tensor, params: Mapping[str, object]) -> Tensor:
    """The combination ``[r/N, .., r/N, 1 − r]`` per row of ``gram`` (float64 [rows, N + 1],
    :func:`~evomerge.methods.angles.combine`) with ``r = N cos θ / (1 + (N − 1) cos θ)`` (:func:`model_stock`)."""
    n = gram.shape[1]
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()  # [rows, N]
    i, j = torch.triu_indices(n, n, offset=1)
    denominator = norms[:, i] * norms[:, j]
    pair_cosines = torch.where(denominator > _ZERO_NORM, gram[:, i, j] / denominator.clamp_min(_ZERO_NORM), 0.0)
    cosine = pair_cosines.mean(1).clamp(0.0, 1.0)  # [rows]
    ratio = (n * cosine / (1 + (n - 1) * cosine)).view(-1, 1)
    return torch.cat([(ratio / n).expand(-1, n), 1.0 - ratio], dim=1)


def model_stock(
    base: Tensor | None,
    sources: Tensor,
    *,
    filter_wise: bool = False,
    seed: int | None = None,
    stats: Tensor | None = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """Model Stock: ``t · θ_avg + (1 − t) · θ0`` with ``t = N cos θ / (1 + (N − 1) cos θ)``.

    ``θ_avg = mean_i θ_i``; ``cos θ`` = mean over pairs ``i < j`` of the cosine between task vectors
    ``τ_i = θ_i − θ0``, computed over the whole tensor, or per output row (dim 0) when ``filter_wise`` and the
    tensor is at least 2-D (from the float64 Gram matrices :func:`model_stock_gram`). Guards: a pair with a ~0
    task vector has cosine 0; ``cos θ`` is clamped to ``[0, 1]`` (anti-correlated task vectors give ``t = 0``,
    the base). So identical sources give ``t = 1``: that model; sources equal to the base give the base.
    Computed as ``Σ (t/N) θ_i + (1 − t) θ0`` (:func:`model_stock_coefficients`, or ``coefficients`` computed
    beforehand). Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV.
    """
    _require_base(base)
    n = sources.shape[0]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 sources to measure an angle, got {n}")
    if coefficients is None:
        params = {"filter_wise": filter_wise}
        coefficients = model_stock_coefficients(model_stock_gram(base, sources, params), params)
    return combine(base, sources, coefficients)
