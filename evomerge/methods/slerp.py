"""Spherical interpolation of two checkpoints (SLERP), in two steps: the angle, then a weighted combination.

Each tensor is flattened to a vector. The angle comes from the unit directions; the interpolation coefficients are
then applied to the unnormalised vectors (as Shoemake's formula and mergekit do), so two vectors of equal norm
``r`` interpolate on the sphere of radius ``r``.

SLERP follows mergekit (``mergekit/merge_methods/slerp.py``) operation for operation in float32, so an fp32 merge on
CPU gives its bits: norms of chunks of 2^20 entries, then the norm of those; a norm ``<= 1e-8`` is replaced by 1 (the
vector is not a direction: its cosine is 0, not a linear fallback); the dot product of the normalised chunks,
clamped to ``[-1, 1]``; linear interpolation when ``|cos| > 0.9995`` (nearly (anti-)parallel, e.g. norm weights).
The result ``c_a a + c_b b`` has coefficients that depend on the angle and ``t`` only: the engine measures the
angle once per tensor (the registry's ``Coefficients.gram``: :func:`slerp_gram`), the coefficients once per
candidate (:func:`slerp_coefficients`), and merges entrywise. Multi-SLERP and NuSLERP, whose mergekit versions
renormalise the tensors themselves, live in :mod:`evomerge.methods.sphere`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

_ZERO_NORM = 1e-8  # slerp: a norm at or below it is replaced by 1 (mergekit's normalize)
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


def slerp_coefficients(gram: Tensor, params: Mapping[str, object]) -> Tensor:
    """:func:`slerp`'s combination ``[c_a, c_b]`` (float32 values, float64 [2]) from :func:`slerp_gram`, in float32
    as mergekit:
    ``c_a = sin((1 − t)Ω)/sin Ω``, ``c_b = sin(tΩ)/sin Ω`` with ``Ω = arccos(cos)``, or ``(1 − t, t)`` when
    ``|cos| > 0.9995``."""
    t = torch.tensor(float(params["t"]), dtype=torch.float32)  # type: ignore[arg-type]
    dot = gram[0, 0, 1].float()
    linear = dot.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([coef_a, coef_b]).double()


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
    c = coefficients.to(device=sources.device, dtype=torch.float32)
    return sources[0] * c[0] + sources[1] * c[1]
