"""Merges that decide per entry which task vectors take part: SCE (select, calculate, erase) and RAM.

With base ``θ0`` and task vectors ``τ_i = θ_i − θ0`` ([N, *S]): SCE keeps the entries where the sources vary most,
weighs each source by its mean squared change and averages the sources that agree with the elected sign; RAM
keeps an entry changed by one source as it is and averages an entry changed by several. Arithmetic follows
mergekit's (the order of operations fixes the rounding, so fp32 merges match it bit for bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SCE_MIN_WEIGHT_SUM = 1e-6  # mergekit: below this the sources' weights are uniform; also the divisor's floor


def _require_base(base: Tensor | None, method: str) -> Tensor:
    if base is None:
        raise ValueError(f"{method} merges task vectors θ_i − θ_base: it needs a base model")
    return base


def sce_select(tau: Tensor, fraction: float) -> Tensor:
    """SCE's select step: 1 at the ``k = floor(fraction · nnz(var))`` entries of largest variance across the
    sources ``var_j = Var_i τ_i[j]`` (population variance; ``nnz``: entries where it is not 0), else 0 ([*S],
    float32). Ties at the k-th variance: the entries torch.topk picks."""
    if fraction <= 0:
        return torch.zeros_like(tau[0])
    if fraction >= 1:
        return torch.ones_like(tau[0])
    var = torch.var(tau, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_weights(tau: Tensor) -> Tensor:
    """SCE's calculate step: ``w_i = mean_j τ_i[j]² / Σ_k mean_j τ_k[j]²`` ([N]); uniform ``1/N`` when that sum is
    below 1e-6 (the sum taken as a float64 scalar of the float32 sum)."""
    energy = tau.square().reshape(tau.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < _SCE_MIN_WEIGHT_SUM:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def elected_sign_mask(tau: Tensor) -> Tensor:
    """SCE's erase step: ``sign(τ_i) = s`` with the elected sign ``s = +1 if Σ_i τ_i ≥ 0 else −1`` per entry
    ([N, *S] bool; a zero entry agrees with neither sign; a zero sum elects +1), as mergekit's TIES ``sum``
    election."""
    majority = (tau.sum(dim=0) >= 0).float() * 2 - 1
    return tau.sign() == majority


def sce(
    base: Tensor | None, sources: Tensor, *, select_topk: float = 1.0
) -> Tensor:
    """SCE: ``θ0 + Σ_i w_i m_i τ'_i / max(Σ_i w_i m_i, 1e-6)`` per entry.

    ``τ'_i = τ_i · M`` with ``M`` the top-``select_topk`` fraction of entries by variance across sources
    (:func:`sce_select`, skipped when ``select_topk ≥ 1``); ``w_i`` the share of ``τ'_i``'s mean squared entry
    (:func:`sce_weights`); ``m_i`` whether ``τ'_i`` has the elected sign (:func:`elected_sign_mask`).
    Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv:2408.07990, FuseChat-2), the SCE merge as
    mergekit's ``sce`` implements it.
    """
    base = _require_base(base, "sce")
    tau = sources - base
    if select_topk < 1:
        tau = tau * sce_select(tau, select_topk).unsqueeze(0)
    agree = elected_sign_mask(tau)
    weights = sce_weights(tau).view(-1, *([1] * (tau.dim() - 1)))
    erased = weights * agree
    merged = (tau * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=_SCE_MIN_WEIGHT_SUM)


def _contributors(tau: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RAM's view of the task vectors: ``τ`` as [N, M], which entries each source changes (``|τ_i| > ε``), how many
    sources change each entry [1, M], and where that is several (overlap) or exactly one (unique)."""
    flat = tau.reshape(tau.shape[0], -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat, changed, counts, counts > 1, counts == 1


def _disjoint_sum(
    base: Tensor, flat: Tensor, changed: Tensor, counts: Tensor, overlap: Tensor, unique: Tensor, *,
    unique_scale: Tensor | None,
) -> Tensor:
    """``θ0 + Σ_i τ̃_i · ([c = 1] λ_i + [c > 1] / c)`` over :func:`_contributors`' view, ``λ_i`` = ``unique_scale``
    [N] (None: 1, RAM; the sum over sources is torch's ``sum(dim=0)``, as in mergekit)."""
    kept = flat * changed
    alone = kept * unique if unique_scale is None else kept * unique * unique_scale.unsqueeze(-1)
    merged = (alone + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ram(
    base: Tensor | None, sources: Tensor, *, epsilon: float = 1e-5
) -> Tensor:
    """RAM: ``θ0 + Σ_i τ̃_i · ([c = 1] + [c > 1] / c)`` per entry, ``τ̃_i = τ_i · [|τ_i| > ε]``, ``c`` the number of
    sources with ``|τ_i| > ε`` there: an entry changed by one source keeps its change, one changed by several
    gets their mean change.
    "Reinforced Agent Merging" (arXiv:2601.13572), as mergekit's ``ram`` implements it.
    """
    base = _require_base(base, "ram")
    return _disjoint_sum(base, *_contributors(sources - base, epsilon), unique_scale=None)


def ramplus_tl(
    base: Tensor | None, sources: Tensor, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5,
) -> Tensor:
    """RAM+ (tensor-local): RAM with each source's unique entries scaled up by ``λ_i = 1 + r · clamp(ρ_i, 0, α)``,
    ``ρ_i = (#entries source i shares with others) / max(#entries only source i changes, ε)`` counted in this
    tensor: ``θ0 + Σ_i τ̃_i · ([c = 1] λ_i + [c > 1] / c)``.
    "Reinforced Agent Merging" (arXiv:2601.13572), RAM+, as mergekit's ``ramplus_tl`` implements it.
    """
    base = _require_base(base, "ramplus_tl")
    contributors = _contributors(sources - base, epsilon)
    _, changed, _, overlap, unique = contributors
    rho = (changed & overlap).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    return _disjoint_sum(base, *contributors, unique_scale=1 + r * rho.clamp(min=0, max=alpha))
