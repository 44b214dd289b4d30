"""Merges of a base with one other model, decided entry by entry: NearSwap and Arcee Fusion.

Both keep the base ``a = θ0`` and move towards the other model ``b = θ1`` only where the two differ in a chosen way:
NearSwap by how close the entries are, Arcee Fusion by how important the change is. Arithmetic follows mergekit's
(the order of operations fixes the rounding, so fp32 merges match it bit for bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

_NEARSWAP_MIN_DIFF = 1e-6  # mergekit's floor on |a − b| (no division by 0 where the models agree)
_FUSION_EPS = 1e-8  # mergekit's smoothing of both softmax distributions before their KL divergence
_FUSION_QUANTILES = (0.25, 0.5, 0.75)
_FUSION_IQR_FACTOR = 1.5  # Tukey's outlier fence: median + 1.5 · IQR


def _the_other(base: Tensor | None, sources: Tensor, method: str) -> tuple[Tensor, Tensor]:
    if base is None or sources.shape[0] != 1:
        raise ValueError(f"{method} merges a base model with exactly one other model")
    return base, sources[0]


def nearswap(
    base: Tensor | None, sources: Tensor, *, t: float
) -> Tensor:
    """NearSwap: take the other model's entries where they are close to the base's, keep the base's elsewhere.

    ``w = clamp(t / max(|a − b|, 1e-6), 0, 1)``, result ``w · b + (1 − w) · a`` with ``a`` the base and ``b`` the
    other model: entries closer than ``t`` become ``b``'s, farther ones move towards ``b`` by ``t / |a − b|``.
    Entrywise. alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card, Hugging Face, 2024), as mergekit's
    ``nearswap`` implements it.
    """
    a, b = _the_other(base, sources, "nearswap")
    weight = (t / (a - b).abs().clamp(min=_NEARSWAP_MIN_DIFF)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def fusion_importance(other: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance of each change: ``|b − a| · KL(p ‖ q)``, ``p = softmax(b) + ε``,
    ``q = softmax(a) + ε`` (ε = 1e-8) along the last dimension (one KL per row; one for a vector)."""
    p = torch.softmax(other, dim=-1) + _FUSION_EPS
    q = torch.softmax(base, dim=-1) + _FUSION_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(importance: Tensor) -> Tensor:
    """``median + 1.5 · (q3 − q1)`` of the importance scores; the quantile ``q`` of ``n`` sorted values is the one at
    index ``floor(q · (n − 1))`` (``q · (n − 1)`` in float32), no interpolation, as mergekit takes it.

    mergekit estimates the quantiles of a tensor of more than 10⁶ entries from 10⁶ entries drawn at random (torch's
    generator, not reproducible here); this takes them from every entry, so such tensors may differ slightly.
    """
    ordered = torch.sort(importance.reshape(-1)).values
    q = torch.tensor(_FUSION_QUANTILES, dtype=torch.float32)
    index = (q * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[index]
    return median + _FUSION_IQR_FACTOR * (q3 - q1)


def arcee_fusion(base: Tensor | None, sources: Tensor) -> Tensor:
    """Arcee Fusion: take the other model's change only where it is an outlier in importance.

    ``s = |b − a| · KL(softmax(b) ‖ softmax(a))`` (per row, :func:`fusion_importance`), threshold
    ``τ = median(s) + 1.5 · IQR(s)`` (:func:`fusion_threshold`), result ``a + (b − a) · [s ≥ τ]``.
    Arcee AI, "Arcee Fusion" (mergekit's ``arcee_fusion``, https://arcee.ai; no paper).
    """
    a, b = _the_other(base, sources, "arcee_fusion")
    importance = fusion_importance(b, a)
    mask = (importance >= fusion_threshold(importance)).float()
    return a + (b - a) * mask
