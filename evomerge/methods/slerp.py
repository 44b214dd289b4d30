"""Spherical interpolation of two checkpoints (SLERP) and its N-model generalisation (weighted spherical mean).

Both work on each tensor flattened to a vector. Angles come from the unit directions; the interpolation
coefficients are then applied to the unnormalised vectors (as Shoemake's formula and mergekit do), so two
vectors of equal norm ``r`` interpolate on the sphere of radius ``r``. When the directions are (anti-)parallel
(``|cos| > 1 − 1e-6``) or a vector has norm ``<= 1e-8`` the angle is meaningless and the result falls back to
the linear interpolation with the same weights. Dot products are accumulated in float64 (no TF32 matmul):
:func:`~evomerge.methods.angles.gram_matrix`. The result is a combination ``Σ c_i θ_i [+ c_0 θ0]`` whose
coefficients depend on the Gram matrix and the parameters only: the engine computes the Gram matrix once per
tensor (``MergeMethod.gram``) and the coefficients once per candidate, and merges entrywise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from evomerge.methods.angles import combine, gram_matrix

_COLINEAR = 1.0 - 1e-6
_ZERO_NORM = 1e-8
_KARCHER_TOL = 1e-12
_KARCHER_MAX_ITER = 100


def slerp_gram(base: Tensor | None, sources: Tensor, params: Mapping[str, object]) -> Tensor:
    """The Gram matrix [1, 2, 2] :func:`slerp` measures its angle on (of the sources; ``base`` is unused)."""
    return gram_matrix(sources)


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
    """:func:`slerp`'s combination ``[[c_a, c_b, 0]]`` (float64 [1, 3], :func:`~evomerge.methods.angles.combine`):
    ``c_a = sin((1 − t)Ω)/sin Ω``, ``c_b = sin(tΩ)/sin Ω``, or ``(1 − t, t)`` without a meaningful angle."""
    t = float(params["t"])  # type: ignore[arg-type]
    cosine = _cosines(gram[0])
    if cosine is None:
        return torch.tensor([[1.0 - t, t, 0.0]], dtype=torch.float64)
    omega = math.acos(float(cosine[0, 1]))
    sin_omega = math.sin(omega)
    return torch.tensor([[math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega, 0.0]],
                        dtype=torch.float64)


def slerp(
    base: Tensor | None,
    sources: Tensor,
    *,
    t: float,
    seed: int | None = None,
    stats: Tensor | None = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """SLERP between ``a = sources[0]`` (``t = 0``) and ``b = sources[1]`` (``t = 1``); ``base`` is unused.

    ``Ω = arccos(â·b̂)``, ``slerp = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` on the unnormalised vectors;
    ``(1 − t)a + tb`` when nearly (anti-)parallel or a norm is ~0 (module docstring).
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
    seed: int | None = None,
    stats: Tensor | None = None,
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
