"""Sparsification of task vectors and TIES sign election: the shared pieces of TIES / DARE / breadcrumbs / DELLA.

Every sparsifier takes the stacked task vectors ``tau`` [N, *S] and per-source parameters [N] and returns the
sparsified (and, for the random ones, rescaled) task vectors [N, *S]; "per tensor" below means per source
``i`` over all entries of ``tau[i]``.

Counting convention: mergekit's (``mergekit/sparsify.py``), evaluated in float64 like mergekit's Python floats (the
engine passes per-source parameters as float64, so ``0.35·100`` is 35 as in mergekit, not 34 from float32's
0.3499999940). TIES (:func:`ties_keep_count`): ``d >= 1`` keeps all, ``d <= 0`` none, else
``k = max(1, floor(d·n))``. Breadcrumbs (:func:`band_keep_counts`): ``d >= 1`` keeps all (no outlier is dropped),
else ``k_d = floor(d·n)`` entries below the ``k_γ = min(floor(γ·n), n − k_d)`` largest (mergekit shrinks the outlier
drop so that ``k_d`` entries remain).

Tie convention for magnitude masks: an entry is kept when ``|τ| >= t_k`` where ``t_k`` is the exact k-th largest
magnitude (:func:`evomerge.methods.select.kth_largest_rows`, bit-identical to ``torch.topk``). So at least ``k``
entries are kept, and entries equal to the k-th largest are all kept (the count exceeds ``k`` by the number of
extra ties). This is independent of memory layout (no index tie-break) and identical on CPU and CUDA. mergekit
keeps exactly ``k`` (the first ``k`` of ``torch.argsort``, an unstable sort): only when the k-th largest magnitude
occurs several times, at the threshold, do the two tools keep different entries (evomerge all of them, mergekit the
ones its sort puts first); with bf16 task vectors such ties are common, with fp32 ones rare.

Randomness (DARE, DELLA): the uniform draws come from the tensor's ``seed`` through the counter-based generator of
:mod:`evomerge.methods.counter_rng` (entry ``j`` of source ``i`` gets ``H(row_keys(seed, N)[i], j)``), so the same
seed gives the same mask on CPU and CUDA, eagerly or compiled, whole or in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.methods.counter_rng import uniform_like
from evomerge.methods.linear import per_source, source_sum
from evomerge.methods.select import kth_largest_rows, magnitude_ranks


def ties_keep_count(density: Tensor, numel: int) -> Tensor:
    """TIES keep counts as mergekit's ``magnitude``: ``n`` for ``d >= 1``, 0 for ``d <= 0``, else ``max(1, ⌊d·n⌋)``
    (a positive density keeps at least one entry), in float64, per source: [N] int64 on ``density``'s device."""
    d = density.to(torch.float64)
    k = torch.floor(d * numel).clamp(1, numel)
    return torch.where(d >= 1, float(numel), torch.where(d <= 0, 0.0, k)).to(torch.int64)


def band_keep_counts(density: Tensor, gamma: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Breadcrumbs keep counts as mergekit's ``magnitude_outliers``: ``(k_γ + k_d, k_γ)`` (the top ``k_γ + k_d``
    magnitudes without the top ``k_γ``) with ``k_d = ⌊d·n⌋``, ``k_γ = min(⌊γ·n⌋, n − k_d)``; ``d >= 1`` keeps all:
    ``(n, 0)``. float64, per source: two [N] int64 tensors on ``density``'s device."""
    d, g = density.to(torch.float64), gamma.to(device=density.device, dtype=torch.float64)
    kept = torch.floor(d * numel).clamp(0, numel)
    top = torch.minimum(torch.floor(g * numel).clamp_min(0), numel - kept)
    whole = d >= 1
    return (torch.where(whole, float(numel), top + kept).to(torch.int64),
            torch.where(whole, 0.0, top).to(torch.int64))


def kth_magnitudes(tau: Tensor, k: Tensor) -> Tensor:
    """Per source, the ``k_i``-th largest ``|τ_i|`` (exact, :func:`kth_largest_rows`): [N] float32 on ``tau``'s
    device; NaN where ``k_i = 0`` (no comparison passes NaN, so such a mask keeps nothing).

    ``k`` is an int64 tensor [N] on any device (a CPU one costs no device synchronisation).
    """
    magnitude = tau.reshape(tau.shape[0], -1).abs()
    threshold = kth_largest_rows(magnitude, k.clamp_min(1))
    return torch.where(k.to(threshold.device) > 0, threshold, float("nan"))


def top_magnitude_mask(tau: Tensor, density: Tensor, threshold: Tensor | None = None) -> Tensor:
    """Bool mask [N, *S]: per source, ``|τ| >= `` the k-th largest ``|τ|`` with ``k`` = :func:`ties_keep_count`.

    ``k = 0`` keeps nothing (its threshold is NaN, which no comparison passes); ties at the threshold are kept
    (module docstring). ``threshold`` [N]: the precomputed ``kth_magnitudes(tau, ties_keep_count(density, n))``
    (e.g. cached by the engine across candidates); with it the mask is entrywise, so it can be evaluated on any
    slice of the entries.
    """
    return tau.abs() >= per_source(_row_thresholds(tau, density, threshold), tau)


def _row_thresholds(tau: Tensor, density: Tensor, threshold: Tensor | None) -> Tensor:
    """``threshold`` (or the TIES thresholds of ``density`` when None) as float32 [N] on ``tau``'s device."""
    if threshold is None:
        threshold = kth_magnitudes(tau, ties_keep_count(density, tau[0].numel()))
    return threshold.to(device=tau.device, dtype=torch.float32)


def magnitude_prune_rows(tau: Tensor, density: Tensor, thresholds: tuple[Tensor] | None = None) -> list[Tensor]:
    """:func:`magnitude_prune` as a list of the N pruned rows (the form the merges consume: see
    :func:`~evomerge.methods.linear.source_sum`)."""
    t = _row_thresholds(tau, density, None if thresholds is None else thresholds[0])
    return [row * row.abs().ge_(t[i]) for i, row in enumerate(tau)]


def magnitude_prune(tau: Tensor, density: Tensor, thresholds: tuple[Tensor] | None = None) -> Tensor:
    """TIES trim: keep the top-``density`` fraction of each ``τ_i`` by magnitude, zero the rest.

    Kept iff ``|τ| >= t_k`` (:func:`top_magnitude_mask`). ``thresholds``: ``(t,)``, the precomputed
    :func:`kth_magnitudes` of the whole task vectors for :func:`ties_keep_count` ``(density, n)``.
    Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS.
    """
    return torch.stack(magnitude_prune_rows(tau, density, thresholds))


def magnitude_band_prune(
    tau: Tensor, density: Tensor, gamma: Tensor, thresholds: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Breadcrumbs: drop the top-``gamma`` fraction by magnitude (outliers) and keep the next ``density`` fraction.

    Kept: ``t_{k_γ+k_d} <= |τ| < t_{k_γ}`` in magnitude-rank terms, with the counts of :func:`band_keep_counts`;
    everything smaller is dropped too. ``γ = 0`` drops no outliers.
    ``thresholds``: precomputed ``kth_magnitudes`` of ``tau`` for the two counts :func:`band_keep_counts` returns.
    Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV.
    """
    return torch.stack(magnitude_band_prune_rows(tau, density, gamma, thresholds))


def magnitude_band_prune_rows(
    tau: Tensor, density: Tensor, gamma: Tensor, thresholds: tuple[Tensor, Tensor] | None = None
) -> list[Tensor]:
    """:func:`magnitude_band_prune` as a list of the N pruned rows."""
    if thresholds is None:
        thresholds = tuple(kth_magnitudes(tau, k) for k in band_keep_counts(density, gamma, tau[0].numel()))
    upper, lower = (t.to(device=tau.device, dtype=torch.float32) for t in thresholds)
    pruned = []
    for i, row in enumerate(tau):
        magnitude = row.abs()
        inside = magnitude.clone().ge_(upper[i])  # |τ| >= t_{γ+d} ...
        inside.sub_(magnitude.ge_(lower[i]))  # ... and not |τ| >= t_γ (a subset: t_γ >= t_{γ+d})
        pruned.append(row * inside)
    return pruned


def _rescaled(tau: Tensor, keep: Tensor, keep_probability: Tensor, rescale: bool) -> Tensor:
    """``τ · keep / p`` (``rescale``) or ``τ · keep`` for a float 0/1 mask ``keep``; a dropped entry is divided by
    ``p + 1`` instead (never 0, and multiplied by 0 after), a kept one by ``p + 0 = p`` exactly."""
    if not rescale:
        return tau * keep
    return tau / (keep_probability + (1.0 - keep)) * keep


def _uniform(tau: Tensor, seed: int | None) -> Tensor:
    if seed is None:
        raise ValueError(
            "random sparsification (DARE/DELLA) needs a seed: pass seed=<int> (the engine passes each tensor's "
            "seed, evomerge.engine.tensor_seed(recipe seed, tensor name)) so the merge is reproducible"
        )
    return uniform_like(tau, seed)


def random_prune(
    tau: Tensor, density: Tensor, *, rescale: bool, seed: int | None, noise: Tensor | None = None
) -> Tensor:
    """DARE: keep each entry of ``τ_i`` independently with probability ``d_i`` (drop with ``p = 1 − d_i``).

    Entry kept iff ``u < d_i`` with ``u ~ U[0, 1)`` drawn for ``seed`` (module docstring), so ``d = 1`` keeps all
    and ``d = 0`` none; survivors are rescaled by ``1/d_i`` when ``rescale`` so ``E[result] = τ_i``.
    Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch" (DARE), ICML.

    ``noise``: the draw ``u`` [N, *S] made beforehand (``counter_rng.uniform_like(tau, seed)``, or a slice of it
    with the matching slice of ``tau``): with it the drop is entrywise.
    """
    return torch.stack(random_prune_rows(tau, density, rescale=rescale, seed=seed, noise=noise))


def random_prune_rows(
    tau: Tensor, density: Tensor, *, rescale: bool = True, seed: int | None = None, noise: Tensor | None = None
) -> list[Tensor]:
    """:func:`random_prune` as a list of the N pruned rows: ``where(u < d, τ / d, 0)`` (``τ`` without
    ``rescale``); ``d = 0`` keeps nothing, so its division is never used."""
    d = density.to(device=tau.device, dtype=torch.float32)
    divisor = torch.where(d > 0, d, 1.0)  # [N]: d = 0 keeps nothing, so any finite divisor gives the same zeros
    u = _uniform(tau, seed) if noise is None else noise
    return [(row / divisor[i] if rescale else row) * keep_mask(u[i], d[i]) for i, row in enumerate(tau)]


def keep_mask(u: Tensor, d: Tensor) -> Tensor:
    """``u < d`` as a float32 mask of 1s and 0s: ``d − u > 0`` (IEEE subtraction is 0 only for equal operands, so
    the sign is exact). Float masks multiply several times faster on CPU than ``torch.where`` and bool masks."""
    return (d - u).gt_(0)


def relative_ranks(tau: Tensor) -> Tensor:
    """``r / (n − 1)`` for every entry of each ``τ_i`` [N, *S]: ``r`` = number of entries of ``τ_i`` with strictly
    smaller ``|τ|`` (tied magnitudes share the lower rank, so the result is layout independent), ``n = numel``;
    0.5 for a 1-entry tensor. float32, ``tau``'s shape and device. Depends on the task vectors only (the engine
    computes it once per tensor and sources)."""
    n_sources = tau.shape[0]
    magnitude = tau.reshape(n_sources, -1).abs()
    n = magnitude.shape[1]
    if n == 1:
        return torch.full_like(tau, 0.5, dtype=torch.float32)
    return (magnitude_ranks(magnitude).to(device=tau.device, dtype=torch.float32) / (n - 1)).view(tau.shape)


def rank_keep_probability(tau: Tensor, density: Tensor, epsilon: Tensor, ranks: Tensor | None = None) -> Tensor:
    """DELLA keep probabilities [N, *S]: ``p = (d − ε) + 2ε · r / (n − 1)``, linear in the magnitude rank.

    ``r / (n − 1)``: :func:`relative_ranks` of ``tau`` (or ``ranks``, computed beforehand: then the formula is
    entrywise and ``tau`` may be any slice of the entries). Without ties the mean of ``p`` is exactly ``d``.
    """
    relative_rank = relative_ranks(tau) if ranks is None else ranks
    d, eps = per_source(density, tau), per_source(epsilon, tau)
    return (d - eps) + 2 * eps * relative_rank


def rank_random_prune(
    tau: Tensor, density: Tensor, epsilon: Tensor, *, rescale: bool, seed: int | None,
    noise: Tensor | None = None, ranks: Tensor | None = None,
) -> Tensor:
    """DELLA (MAGPRUNE): keep entry ``j`` of ``τ_i`` with probability ``p_j`` (:func:`rank_keep_probability`),
    larger magnitudes more likely; survivors rescaled by ``1/p_j`` when ``rescale``.

    Entry kept iff ``u < p_j``, ``u ~ U[0, 1)`` drawn for ``seed``. ``noise`` / ``ranks``: the draws and
    :func:`relative_ranks` made beforehand (with both, entrywise).
    Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling".
    """
    return torch.stack(rank_random_prune_rows(tau, density, epsilon, rescale=rescale, seed=seed, noise=noise,
                                              ranks=ranks))


def rank_random_prune_rows(
    tau: Tensor, density: Tensor, epsilon: Tensor, *, rescale: bool = True, seed: int | None = None,
    noise: Tensor | None = None, ranks: Tensor | None = None,
) -> list[Tensor]:
    """:func:`rank_random_prune` as a list of the N pruned rows (what the merges consume; as rows, a compiled merge
    keeps every intermediate in registers instead of writing [N, *S] buffers)."""
    p = rank_keep_probability(tau, density, epsilon, ranks)
    u = _uniform(tau, seed) if noise is None else noise
    return [_rescaled(row, keep_mask(u[i], p[i]), p[i], rescale) for i, row in enumerate(tau)]


def disjoint_merge(tau: Tensor | Sequence[Tensor], weight: Tensor, *, normalize: bool) -> Tensor:
    """TIES sign election + disjoint merge of (sparsified) task vectors ([N, *S] or N rows) -> [*S].

    Contributions ``c_i = w_i τ_i``; elected sign per entry ``s = +1`` where ``Σ_i c_i >= 0``, else ``-1`` (the paper
    leaves an exact 0 sum open; +1 is mergekit's choice, so bf16 task vectors, where such sums are common, merge as
    there); source ``i`` takes part in an entry when ``c_i ≠ 0`` and ``sign(c_i) = s`` (for positive weights:
    ``τ_i`` kept and agreeing).
    Result ``Σ_{i agrees} c_i / Σ_{i agrees} w_i`` (``normalize``; 0 where no source agrees; needs ``w_i >= 0``) else
    ``Σ_{i agrees} c_i`` (sums in source order, :func:`~evomerge.methods.linear.source_sum`).
    Yadav et al. 2023 (TIES-Merging), steps "elect" and "disjoint merge".
    """
    rows = list(tau)
    w = weight.to(device=rows[0].device, dtype=torch.float32)
    contributions = [w[i] * row for i, row in enumerate(rows)]
    sign = source_sum(contributions).ge(0).float().mul_(2).sub_(1)
    # float 0/1 masks (several times faster on CPU than bool masks and torch.where); c·s is exact: s is ±1
    agree = [(c * sign).gt_(0) for c in contributions]
    merged = source_sum([a * c for a, c in zip(agree, contributions)])
    if not normalize:
        return merged
    divisor = source_sum([a * w[i] for i, a in enumerate(agree)])
    # weights are >= 0 (registry range), so a zero divisor means every agreeing weight is 0 and merged is 0 there:
    # dividing by the smallest normal float instead gives that 0 (a guard with masks compiles ~4x slower on CPU)
    return merged / divisor.clamp_min(torch.finfo(torch.float32).tiny)
