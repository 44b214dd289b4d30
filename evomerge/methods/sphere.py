"""Spherical merges computed on the tensors themselves: NuSLERP (two models, whole tensor or per row / column),
Multi-SLERP (N models, one tangent step from their mean direction) and the Karcher mean (N models, iterated on the
unit sphere).

Unlike :mod:`evomerge.methods.slerp` these do not go through Gram matrices: their angles and norms are float32
reductions in mergekit, and computing them the same way (same operations, same order) is what makes fp32 merges
match mergekit bit for bit (results/mergekit_parity.md). All three run whole-tensor in the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

_NUSLERP_MIN_NORM = 1e-7  # mergekit: floor of the norms the vectors are divided by
_NUSLERP_COLINEAR_EPS = 1e-8  # mergekit: colinear (linear fallback) when 1 − cos²θ ≤ eps²
_NUSLERP_ZERO_WEIGHTS = 1e-6  # mergekit: |w_0 + w_1| below this gives t = 1/2


def nuslerp_factor(weight: Tensor) -> float:
    """NuSLERP's interpolation factor from the two weights: ``t = w_1 / (w_0 + w_1)`` (in float64), ``1/2`` when
    ``|w_0 + w_1| < 1e-6``."""
    w0, w1 = (float(w) for w in weight.tolist())
    total = w0 + w1
    return 0.5 if abs(total) < _NUSLERP_ZERO_WEIGHTS else w1 / total


def slerp_vectors(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """SLERP of the vectors along the last dimension of ``v0`` and ``v1`` (each row on its own):
    ``(sin((1 − t)θ) v0 + sin(tθ) v1) / sin θ`` with ``cos θ = ⟨v0/‖v0‖, v1/‖v1‖⟩`` (norms floored at 1e-7,
    clamped to [−1, 1]); ``(1 − t) v0 + t v1`` where ``1 − cos²θ ≤ 1e-16`` (colinear). Shoemake 1985, "Animating
    rotation with quaternion curves", SIGGRAPH."""
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NUSLERP_MIN_NORM)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NUSLERP_MIN_NORM)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # the spherical branch stays finite where it is not taken
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(
    base: Tensor | None, sources: Tensor, *, weight: Tensor, nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """NuSLERP: SLERP of two models (or, with a base, ``θ0 +`` SLERP of their task vectors) at
    ``t = w_1 / (w_0 + w_1)`` (:func:`nuslerp_factor`, :func:`slerp_vectors`).

    ``nuslerp_flatten`` (default): one angle for the whole tensor; else one per vector along the last dimension
    (per row of a matrix), or along the first (per column) with ``nuslerp_row_wise``; a vector is one vector.
    mergekit's ``nuslerp`` (Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for Merging Large Language Models",
    EMNLP Industry), generalising Shoemake 1985's SLERP.
    """
    if sources.shape[0] != 2:
        raise ValueError(f"nuslerp merges exactly two models, got {sources.shape[0]}")
    t = nuslerp_factor(weight)
    v0, v1 = (sources[0], sources[1]) if base is None else (sources[0] - base, sources[1] - base)
    if nuslerp_flatten:
        merged = slerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    elif nuslerp_row_wise:
        merged = slerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        merged = slerp_vectors(t, v0, v1)
    return merged if base is None else base + merged


MULTISLERP_EPS = 1e-8  # mergekit's default eps: added to every norm divided by, and the degenerate-mean threshold


def multislerp(
    base: Tensor | None, sources: Tensor, *, weight: Tensor, normalize_weights: bool = True,
    eps: float = MULTISLERP_EPS,
) -> Tensor:
    """Multi-SLERP as mergekit defines it (``mergekit/merge_methods/multislerp.py``; C. Goddard, "Multi-SLERP",
    goddard.blog, 2025): the weighted mean of the unit directions, renormalised, moved one exponential-map step
    along the weighted tangent vector, at the weighted mean norm.

    ``x_i = θ_i − θ0`` (with a base) or ``θ_i``, flattened; ``w = weight / Σ weight`` (``normalize_weights``, else
    as given); ``u_i = x_i / (‖x_i‖ + ε)``; ``M = Σ_i w_i u_i``, ``m = M / ‖M‖``; tangent
    ``g = Σ_i w_i (u_i − (u_i·m) m)``, ``s = ‖g‖ + ε``; result ``[θ0 +] (cos s · m + sin s / s · g) · Σ_i w_i ‖x_i‖``.
    ``g = M − (M·m) m`` is 0 but for rounding, so this is not the spherical (Karcher) mean and, for two sources,
    not :func:`~evomerge.methods.slerp.slerp` (for those: ``karcher`` / ``slerp``); the step is kept, in float32
    and in mergekit's order, because its rounding is part of mergekit's bits. One source is returned as is;
    ``‖M‖ < ε`` (antipodal directions whose weights balance out): two sources give ``[θ0 +] w_0 x_0 + w_1 x_1``,
    more raise (as mergekit).
    """
    n = sources.shape[0]
    if n == 1:
        return sources[0]
    w = weight.to(device=sources.device, dtype=torch.float32).reshape(-1)
    if normalize_weights:
        total = w.sum()
        if total.item() == 0:
            raise ValueError(f"multislerp normalizes its weights, but they sum to 0 ({w.tolist()}): use weights "
                             "with a nonzero sum, or normalize_weights: false")
        w = w / total
    x = (sources if base is None else sources - base).reshape(n, -1)
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm.item() < eps:
        if n != 2:
            raise ValueError("multislerp: the weighted sum of the directions is zero (antipodal vectors whose "
                             "weights balance out); use different weights")
        merged = x[0] * w[0] + x[1] * w[1]
    else:
        mean = mean / mean_norm
        units -= (units * mean).sum(-1, keepdim=True) * mean  # the tangent vectors at m
        tangent = (units * w.view(-1, 1)).sum(0)
        step = torch.linalg.vector_norm(tangent) + eps
        merged = (mean * torch.cos(step) + tangent * (torch.sin(step) / step)) * (norms.squeeze(-1) * w).sum()
    merged = merged.view(sources.shape[1:])
    return merged if base is None else merged + base


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x)


def karcher_mean(tensors: list[Tensor], alphas: list[float], *, max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher (Riemannian, Fréchet) mean of the directions, scaled by the weighted mean norm.

    ``u_i = x_i / ‖x_i‖`` of the inputs with ``‖x_i‖ > tol`` (weights renormalised over those), started at their
    normalised weighted mean (``u_0`` if that is shorter than ``tol``), then up to ``max_iter`` Riemannian gradient
    steps on the sphere: tangent ``g = Σ_i a_i (θ_i / sin θ_i)(u_i − cos θ_i · μ)``, ``cos θ_i = ⟨μ, u_i⟩`` (inputs
    with ``θ_i < tol`` skipped), ``μ ← cos‖g‖ μ + sin‖g‖ g/‖g‖``, renormalised; stop when ``‖g‖ < tol``.
    Result ``(Σ_i α_i ‖x_i‖) μ`` over all inputs; 0 when no input is longer than ``tol``.
    Karcher 1977, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math.; the iteration as
    mergekit's ``karcher`` computes it (float32, tensors flattened).
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    length = _norm(mean)
    mean = points[0].clone() if length.item() < tol else mean / length
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step = _norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = _norm(mean)
        if length.item() > tol:
            mean = mean / length
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


def karcher(
    base: Tensor | None, sources: Tensor, *, max_iter: float = 10, tol: float = 1e-5
) -> Tensor:
    """Karcher mean of the sources with equal weights (:func:`karcher_mean`); ``base`` is not used (a base model
    that mergekit's config lists or adds is one of the sources here, see evomerge.recipe.mergekit)."""
    n = sources.shape[0]
    return karcher_mean(list(sources), [1.0 / n] * n, max_iter=int(max_iter), tol=tol)
