"""TIES, DARE, breadcrumbs and DELLA: one pipeline over task vectors, parameterised by its two stages.

    τ_i = θ_i − θ0  →  τ'_i = sparsify(τ_i)  →  m = disjoint_merge(τ', w)   (sign election, "*ties", della)
                                               m = Σ_i w_i τ'_i [/ Σ_i w_i]  (linear variants)
    result = θ0 + λ · m

The sparsifiers, the tie / rounding conventions and the randomness contract are in
:mod:`evomerge.methods.sparsify`. ``normalize`` divides by the (agreeing) weights, see
:func:`~evomerge.methods.sparsify.disjoint_merge` and :func:`~evomerge.methods.linear.weighted_sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from evomerge.methods.linear import weighted_sum
from evomerge.methods.sparsify import (
    disjoint_merge,
    magnitude_band_prune_rows,
    magnitude_prune_rows,
    random_prune_rows,
    rank_random_prune_rows,
)


def sparse_task_merge(
    base: Tensor | None,
    sources: Tensor,
    sparsify: Callable[[Tensor], Tensor | Sequence[Tensor]],
    *,
    weight: Tensor,
    lam: float,
    normalize: bool,
    sign_election: bool,
) -> Tensor:
    """``θ0 + λ · merge(sparsify(θ_i − θ0))`` with ``merge`` = TIES disjoint merge or a weighted sum.

    ``sparsify`` maps the task vectors [N, *S] to the N sparsified rows (or a stacked tensor of them).
    """
    if base is None:
        raise ValueError("sparsified task-vector merges (TIES/DARE/breadcrumbs/DELLA) need a base model")
    tau = sparsify(sources - base)
    if sign_election:
        merged = disjoint_merge(tau, weight, normalize=normalize)
    else:
        merged = weighted_sum(tau, weight, normalize=normalize)
    return base + merged * lam  # multiply, then add: one rounding each in every kernel (eager or compiled)


def ties(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lam: float = 1.0,
    normalize: bool = True,
    seed: int | None = None,
    stats: Tensor | None = None,
    thresholds: tuple[Tensor] | None = None,
) -> Tensor:
    """TIES-Merging: trim each ``τ_i`` to its top-``d_i`` magnitudes, elect signs, disjoint mean; ``θ0 + λ·m``.

    ``thresholds``: ``(t,)`` with ``t`` = :func:`~evomerge.methods.sparsify.kth_magnitudes` of the whole task
    vectors for :func:`~evomerge.methods.sparsify.ties_keep_count` ``(density, n)`` (mergekit's count,
    ``max(1, ⌊d·n⌋)``), computed beforehand (then the merge is entrywise; registry: ``MergeMethod.keep_counts``).
    Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS.
    """
    threshold = None if thresholds is None else thresholds[0]
    return sparse_task_merge(
        base, sources, lambda tau: magnitude_prune_rows(tau, density, threshold),
        weight=weight, lam=lam, normalize=normalize, sign_election=True,
    )


def dare_linear(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    seed: int | None = None,
    stats: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """DARE + task arithmetic: drop entries of ``τ_i`` with prob ``1 − d_i``, rescale by ``1/d_i``, weighted sum.

    ``noise``: the uniform draw made beforehand (:func:`~evomerge.methods.sparsify.random_prune`).
    Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch", ICML.
    """
    return sparse_task_merge(
        base, sources, lambda tau: random_prune_rows(tau, density, rescale=rescale, seed=seed, noise=noise),
        weight=weight, lam=lam, normalize=normalize, sign_election=False,
    )


def dare_ties(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    seed: int | None = None,
    stats: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """DARE drop-and-rescale of each ``τ_i``, then TIES sign election and disjoint merge (``noise`` as in
    :func:`dare_linear`). Yu et al. 2024."""
    return sparse_task_merge(
        base, sources, lambda tau: random_prune_rows(tau, density, rescale=rescale, seed=seed, noise=noise),
        weight=weight, lam=lam, normalize=normalize, sign_election=True,
    )


def breadcrumbs(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    gamma: Tensor,
    lam: float = 1.0,
    normalize: bool = False,
    seed: int | None = None,
    stats: Tensor | None = None,
    thresholds: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Model Breadcrumbs: per ``τ_i`` drop the top-``γ_i`` magnitudes and keep the next ``d_i``; weighted sum.

    ``thresholds``: precomputed magnitude thresholds of the band's two counts (``sparsify.band_keep_counts``).
    Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV.
    """
    return sparse_task_merge(
        base, sources, lambda tau: magnitude_band_prune_rows(tau, density, gamma, thresholds),
        weight=weight, lam=lam, normalize=normalize, sign_election=False,
    )


def breadcrumbs_ties(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    gamma: Tensor,
    lam: float = 1.0,
    normalize: bool = False,
    seed: int | None = None,
    stats: Tensor | None = None,
    thresholds: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Breadcrumbs masks followed by TIES sign election and disjoint merge. Davari & Belilovsky 2024."""
    return sparse_task_merge(
        base, sources, lambda tau: magnitude_band_prune_rows(tau, density, gamma, thresholds),
        weight=weight, lam=lam, normalize=normalize, sign_election=True,
    )


def della(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    epsilon: Tensor,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
    seed: int | None = None,
    stats: Tensor | None = None,
    noise: Tensor | None = None,
    ranks: Tensor | None = None,
) -> Tensor:
    """DELLA-Merging: magnitude-ranked random drop (keep prob in ``[d − ε, d + ε]``), rescale ``1/p``, TIES elect
    and disjoint merge (``noise`` / ``ranks`` made beforehand: :func:`~evomerge.methods.sparsify.rank_random_prune`).
    Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling".
    """
    return sparse_task_merge(
        base, sources,
        lambda tau: rank_random_prune_rows(
            tau, density, epsilon, rescale=rescale, seed=seed, noise=noise, ranks=ranks),
        weight=weight, lam=lam, normalize=normalize, sign_election=True,
    )


def della_linear(
    base: Tensor | None,
    sources: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    epsilon: Tensor,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    seed: int | None = None,
    stats: Tensor | None = None,
    noise: Tensor | None = None,
    ranks: Tensor | None = None,
) -> Tensor:
    """DELLA drop-and-rescale of each ``τ_i`` followed by a plain weighted sum (no sign election; ``noise`` /
    ``ranks`` as in :func:`della`). Deep et al. 2024."""
    return sparse_task_merge(
        base, sources,
        lambda tau: rank_random_prune_rows(
            tau, density, epsilon, rescale=rescale, seed=seed, noise=noise, ranks=ranks),
        weight=weight, lam=lam, normalize=normalize, sign_election=False,
    )
