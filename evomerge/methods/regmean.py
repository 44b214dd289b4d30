"""RegMean: closed-form merge of linear layers that best reproduces every source's outputs on its own inputs."""

from __future__ import annotations

import torch
from torch import Tensor


def regmean(
    base: Tensor | None,
    sources: Tensor,
    *,
    alpha: float = 0.9,
    stats: Tensor | None = None,
) -> Tensor:
    """RegMean for an ``nn.Linear`` weight ``W`` [out, in] (``y = x Wᵀ``), from input Gram matrices.

    ``stats`` = ``G_i = Σ_x x xᵀ`` [N, in, in] of the inputs ``x`` that layer saw in model ``i``
    (:func:`evomerge.methods.statistics.gram_matrices`). RegMean solves
    ``min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²``, i.e. ``W* = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹``, with the off-diagonal entries
    scaled down for stability: ``G̃_i = α G_i + (1 − α) diag(G_i)`` (``α = 1``: plain least squares).
    Solved as ``W* A = B`` with ``torch.linalg.solve`` in float64 (Gram matrices of LM activations are badly
    conditioned). An input feature that no model ever saw (zero row/column of ``A``) leaves its column of
    ``W*`` undetermined; it gets the mean of the sources' columns. Tensors without stats (biases, norms,
    embeddings: ``stats=None``) get the simple average ``mean_i θ_i``. ``base`` is unused.
    Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR.
    """
    average = sources.mean(0)
    if stats is None:
        return average
    if sources.dim() != 3 or stats.shape != (sources.shape[0], sources.shape[2], sources.shape[2]):
        raise ValueError(
            "regmean: stats must be one input Gram matrix [in, in] per source for a 2-D weight [out, in];"
            f" got sources {tuple(sources.shape)} and stats {tuple(stats.shape)}"
        )
    gram = stats.to(device=sources.device, dtype=torch.float64)
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    reduced = alpha * gram + (1 - alpha) * torch.diag_embed(diagonal)
    lhs = reduced.sum(0)  # A = Σ G̃_i            [in, in]
    rhs = (sources.to(torch.float64) @ reduced).sum(0)  # B = Σ W_i G̃_i   [out, in]
    unseen = diagonal.sum(0) == 0
    lhs = lhs + torch.diag(unseen.to(torch.float64))
    rhs = torch.where(unseen, average.to(torch.float64), rhs)
    return torch.linalg.solve(lhs, rhs, left=False).to(torch.float32)
