"""Spherical interpolation of two checkpoints (SLERP) and its N-model generalisation (weighted spherical mean).

Both work on each tensor flattened to a vector. Angles come from the unit directions; the interpolation
coefficients are then applied to the unnormalised vectors (as Shoemake's formula and mergekit do), so two
vectors of equal norm ``r`` interpolate on the sphere of radius ``r``.

SLERP follows mergekit (``mergekit/merge_methods/slerp.py``) operation for operation in float32, so an fp32 merge on
CPU gives its bits: norms of chunks of 2^20 entries, then the norm of those; a norm ``<= 1e-8`` is replaced by 1 (the
vector is not a direction: its cosine is 0, not a linear fallback); the dot product of the normalised chunks,
clamped to ``[-1, 1]``; linear interpolation when ``|cos| > 0.9995`` (nearly (anti-)parallel, e.g. norm weights).
Multi-SLERP is mergekit's: the renormalised weighted mean of the unit directions at the weighted mean norm
(:func:`multislerp`), from dot products accumulated in float64 (no TF32 matmul):
:func:`~evomerge.methods.angles.gram_matrix`.
The result is a combination ``Σ c_i θ_i [+ c_0 θ0]`` whose coefficients depend on the angle statistics and the
parameters only: the engine computes the statistics once per tensor (the registry's ``Coefficients.gram``) and
the coefficients once per candidate, and merges entrywise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from evomerge.methods.angles import combine, gram_matrix

_ZERO_NORM = 1e-8  # slerp: a norm at or below it is replaced by 1 (mergekit's normalize)
_MULTISLERP_EPS = 1e-8  # multislerp: mergekit's eps, added to each norm; also the floor of the mean direction's norm
_SLERP_DOT_THRESHOLD = 0.9995  # mergekit's slerp(dot_threshold=0.9995, eps=1e-8)
_SLERP_CHUNK = 1 << 20


def slerp_gram(base: Tensor | None, sources: Tensor, params: Mapping[str, object]) -> Tensor:
    """What :func:`slerp` measures its angle on, as mergekit computes it in float32 (module docstring): a float64 CPU
    tensor [1, 2, 2] holding the float32 values ``[[|a|, cos], [cos, |b|]]`` (norms ``<= 1e-8`` replaced by 1, cos
    clamped to ``[-1, 1]``) of ``a, b = sources``; ``base`` is unused."""
    a, b = (row.reshape(1, -1).float() for row in sources)
    chunks = range(0, a.shape[1], _SLERP_CHUNK)

    def norm(x: Tensor) -> Tensor:
        parts = [torch.linalg.vector_norm(x[:, i : i + _SLERP_CHUNK], dim=1, keepdim=True) for i in chunks]
        value = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(value > _ZERO_NORM, value, 1)

    norm_a, norm_b = norm(a), norm(b)
    dot = torch.stack([(a[:, i : i + _SLERP_CHUNK] / norm_a * (b[:, i : i + _SLERP_CHUNK] / norm_b)).sum(
        dim=1, keepdim=True) for i in chunks]).sum(dim=0).clamp(-1, 1)
    return torch.stack([torch.cat([norm_a, dot], 1), torch.cat([dot, norm_b], 1)], 1).double().cpu()


def multislerp_gram(base: Tensor | None, sources: Tensor, params: Mapping[str, object]) -> Tensor:
    """The Gram matrix [1, N, N] :func:`multislerp` works with: of the task vectors with a base, else the sources."""
    return gram_matrix(sources if base is None else sources - base)


def slerp_coefficients(gram: Tensor, params: Mapping[str, object]) -> Tensor:
    """:func:`slerp`'s combination ``[[c_a, c_b, 0]]`` (float32 values, float64 [1, 3],
    :func:`~evomerge.methods.angles.combine`) from :func:`slerp_gram`, in float32 as mergekit:
    ``c_a = sin((1 − t)Ω)/sin Ω``, ``c_b = sin(tΩ)/sin Ω`` with ``Ω = arccos(cos)``, or ``(1 − t, t)`` when
    ``|cos| > 0.9995``."""
    t = torch.tensor(float(params["t"]), dtype=torch.float32)  # type: ignore[arg-type]
    dot = gram[0, 0, 1].float()
    linear = dot.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([coef_a, coef_b, torch.zeros(())]).view(1, 3).double()


def slerp(
    base: Tensor | None,
    sources: Tensor,
    *,
    t: float,
    coefficients: Tensor | None = None,
) -> Tensor:
    """SLERP between ``a = sources[0]`` (``t = 0``) and ``b = sources[1]`` (``t = 1``); ``base`` is unused.

    ``Ω = arccos(â·b̂)``, ``slerp = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` on the unnormalised vectors;
    ``(1 − t)a + tb`` when nearly (anti-)parallel, ``|cos| > 0.9995`` (module docstring: mergekit's convention).
    Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH.
    ``coefficients``: :func:`slerp_coefficients` of :func:`slerp_gram`, computed beforehand (then entrywise).
    """
    if sources.shape[0] != 2:
        raise ValueError(f"slerp takes exactly 2 sources, got {sources.shape[0]}")
    if coefficients is None:
        coefficients = slerp_coefficients(slerp_gram(base, sources, {}), {"t": t})
    return combine(None, sources, coefficients)


def multislerp_coefficients(gram: Tensor, params: Mapping[str, object]) -> Tensor:
    """:func:`multislerp`'s combination ``[[c_1 .. c_N, 1 − Σ c]]`` (float64 [1, N + 1]) from the Gram matrix of
    the vectors it interpolates (the base term applies to task vectors: ``θ0 + Σ c_i (θ_i − θ0) = Σ c_i θ_i +
    (1 − Σ c_i) θ0``). With ``w = weight / Σ weight``, norms ``n_i = sqrt(G_ii)`` and mergekit's ``ε = 1e-8``:
    ``|M|² = Σ_ij w_i w_j G_ij / ((n_i + ε)(n_j + ε))`` and ``c_i = w_i / (n_i + ε) · Σ_j w_j n_j / |M|``; a
    vector of norm 0 gets ``c_i = 0`` (its term is 0; a huge ``c_i`` would only add rounding noise through the
    base term). One source: ``c = (1)``, the source itself, as mergekit returns it."""
    w = torch.as_tensor(params["weight"]).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"multislerp needs weights with a positive sum, got {w.tolist()}")
    if w.numel() == 1:
        c = torch.ones(1, dtype=torch.float64)
    else:
        w = w / total
        g = gram[0].to(torch.float64)
        norms = g.diagonal().clamp_min(0.0).sqrt()
        scaled = norms + _MULTISLERP_EPS  # mergekit divides by norm + eps
        mean_norm = math.sqrt(max(float(w @ (g / (scaled[:, None] * scaled[None, :])) @ w), 0.0))
        if mean_norm < _MULTISLERP_EPS:
            if w.numel() != 2:
                raise ValueError("multislerp: the weighted sum of the directions is zero (antipodal vectors whose "
                                 "weights balance out); use different weights")
            c = w  # mergekit's fallback for two sources: the linear interpolation
        else:
            c = torch.where(norms > 0, w / scaled * float(w @ norms) / mean_norm, 0.0)
    c = c.to(torch.float32).to(torch.float64)  # the values combine applies, so the base term cancels them exactly
    return torch.cat([c, (1.0 - c.sum()).view(1)]).view(1, -1)


def multislerp(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    coefficients: Tensor | None = None,
) -> Tensor:
    """Multi-SLERP as mergekit defines it (``mergekit/merge_methods/multislerp.py``; C. Goddard, "Multi-SLERP",
    goddard.blog, 2025): the weighted mean of the unit directions, renormalised, at the weighted mean norm.

    ``x_i = θ_i − θ0`` (with base) or ``θ_i``; ``w = weight / Σ weight``; ``u_i = x_i / (|x_i| + ε)``;
    ``M = Σ_i w_i u_i``, ``m = M / |M|``; result ``[θ0 +] m · Σ_i w_i |x_i|``. mergekit then maps the weighted
    tangent vector ``Σ_i w_i (u_i − (u_i·m) m)`` back to the sphere at ``m``, but that vector is
    ``M − (M·m) m = 0``: the step changes nothing beyond rounding, so it is left out. The result is therefore not
    the spherical (Karcher) mean and, for two sources, not :func:`slerp` (for that: ``karcher`` / ``slerp``).
    Degenerate ``|M| < ε``: two sources interpolate linearly, more raise (as mergekit). Computed as
    ``Σ c_i θ_i [+ (1 − Σ c_i) θ0]`` (:func:`multislerp_coefficients`, or ``coefficients`` computed beforehand:
    then entrywise).
    """
    if coefficients is None:
        coefficients = multislerp_coefficients(multislerp_gram(base, sources, {}), {"weight": weight})
    return combine(base, sources, coefficients)
