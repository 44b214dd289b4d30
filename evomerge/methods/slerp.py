"""Spherical interpolation of two checkpoints (SLERP) and its N-model generalisation (weighted spherical mean).

Both work on each tensor flattened to a vector. Angles come from the unit directions; the interpolation
coefficients are then applied to the unnormalised vectors (as Shoemake's formula and mergekit do), so two
vectors of equal norm ``r`` interpolate on the sphere of radius ``r``.

SLERP follows mergekit (``mergekit/merge_methods/slerp.py``) operation for operation in float32, so an fp32 merge on
CPU gives its bits: norms of chunks of 2^20 entries, then the norm of those; a norm ``<= 1e-8`` is replaced by 1 (the
vector is not a direction: its cosine is 0, not a linear fallback); the dot product of the normalised chunks,
clamped to ``[-1, 1]``; linear interpolation when ``|cos| > 0.9995`` (nearly (anti-)parallel, e.g. norm weights).
Multi-SLERP falls back to the linear combination when ``|cos| > 1 − 1e-6`` for every pair or a norm is ``<= 1e-8``,
with dot products accumulated in float64 (no TF32 matmul): :func:`~evomerge.methods.angles.gram_matrix`.
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

_COLINEAR = 1.0 - 1e-6
_ZERO_NORM = 1e-8
_SLERP_DOT_THRESHOLD = 0.9995  # mergekit's slerp(dot_threshold=0.9995, eps=1e-8)
_SLERP_CHUNK = 1 << 20
_KARCHER_TOL = 1e-12
_KARCHER_MAX_ITER = 100


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


def _cosines(gram: Tensor) -> Tensor | None:
    """Cosine matrix from a Gram matrix, or None when some vector is ~0 or all directions are pairwise
    (anti-)parallel: then angles are meaningless and callers interpolate linearly."""
    norms = gram.diagonal().sqrt()
    if bool((norms <= _ZERO_NORM).any()):
        return None
    cosine = gram / (norms[:, None] * norms[None, :])
    return None if bool((cosine.abs() > _COLINEAR).all()) else cosine


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


def karcher_coefficients(cosine: Tensor, weight: Tensor) -> Tensor:
    """Coefficients ``c`` with ``m = Σ_i c_i u_i`` = weighted Karcher (Fréchet) mean of unit vectors ``u_i``.

    Works in the span of the ``u_i`` using only their cosine matrix ``C`` [N, N] (float64) and weights ``w``
    (summing to 1). ``m`` minimises ``Σ_i w_i θ_i²`` with ``θ_i = ∠(u_i, m)``; iterate the Riemannian fixed point
    ``m ← exp_m(Σ_i w_i log_m u_i)``, ``log_m u_i = θ_i / sin θ_i · (u_i − cos θ_i · m)``, from the normalised
    Euclidean mean. At the optimum ``c_i = (w_i θ_i / sin θ_i) / Σ_j w_j θ_j cot θ_j``; for two vectors with weights
    ``(1 − t, t)`` these are exactly Shoemake's ``sin((1 − t)Ω)/sin Ω`` and ``sin(tΩ)/sin Ω``.
    """
    a = weight / torch.sqrt(weight @ cosine @ weight)
    for _ in range(_KARCHER_MAX_ITER):
        cos_theta = (cosine @ a).clamp(-1.0, 1.0)
        theta = torch.arccos(cos_theta)
        theta_over_sin = torch.where(theta > 1e-7, theta / torch.sin(theta), torch.ones_like(theta))
        step = weight * theta_over_sin - (weight * theta_over_sin * cos_theta).sum() * a  # Σ w_i log_m u_i
        step_norm = float(torch.sqrt((step @ cosine @ step).clamp_min(0.0)))
        if step_norm < _KARCHER_TOL:
            break
        a = math.cos(step_norm) * a + math.sin(step_norm) / step_norm * step
        a = a / torch.sqrt(a @ cosine @ a)
    return a


def multislerp_coefficients(gram: Tensor, params: Mapping[str, object]) -> Tensor:
    """:func:`multislerp`'s combination ``[[c_1 .. c_N, 1 − Σ c]]`` (float64 [1, N + 1]): the Karcher coefficients
    of the normalised weights, or the weights themselves for degenerate geometry; the base term applies to task
    vectors (``θ0 + Σ c_i (θ_i − θ0) = Σ c_i θ_i + (1 − Σ c_i) θ0``)."""
    w = torch.as_tensor(params["weight"]).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"multislerp needs weights with a positive sum, got {w.tolist()}")
    w = w / total
    cosine = _cosines(gram[0])
    if cosine is None or float(w @ cosine @ w) < _ZERO_NORM:  # no angles, or the weighted directions cancel
        c = w
    else:
        c = karcher_coefficients(cosine, w)
    c = c.to(torch.float32).to(torch.float64)  # the values combine applies, so the base term cancels them exactly
    return torch.cat([c, (1.0 - c.sum()).view(1)]).view(1, -1)


def multislerp(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    coefficients: Tensor | None = None,
) -> Tensor:
    """N-model SLERP: weighted spherical (Karcher) mean of the sources, or of task vectors when ``base`` is given.

    ``x_i = θ_i − θ0`` (with base) or ``θ_i``; ``w = weight / Σ weight``; directions ``u_i = x_i / |x_i|``.
    With ``c`` from :func:`karcher_coefficients` (``m = Σ_i c_i u_i`` is the weighted Karcher mean of the
    ``u_i``) the result is ``[θ0 +] Σ_i c_i x_i``: the coefficients are applied to the unnormalised vectors, so
    for N = 2 and ``w = (1 − t, t)`` this is exactly :func:`slerp`. Degenerate geometry falls back to
    ``[θ0 +] Σ_i w_i x_i`` (module docstring). Computed as ``Σ c_i θ_i [+ (1 − Σ c_i) θ0]``
    (:func:`multislerp_coefficients`, or ``coefficients`` computed beforehand: then entrywise).
    Karcher 1977; Buss & Fillmore 2001, "Spherical averages and applications to spherical splines and
    interpolation", ACM TOG; Shoemake 1985.
    """
    if coefficients is None:
        coefficients = multislerp_coefficients(multislerp_gram(base, sources, {}), {"weight": weight})
    return combine(base, sources, coefficients)
