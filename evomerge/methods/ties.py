"""TIES, DARE, breadcrumbs and DELLA: one pipeline over task vectors, parameterised by its two stages.

    τ_i = θ_i − θ0  →  τ'_i = sparsify(τ_i)  →  m = disjoint_merge(τ', w)   (sign election: "*ties", della)
                                               m = Σ_i w_i τ'_i [/ Σ_i w_i]  (linear variants)
    result = θ0 + λ · m

The family is the table :data:`FAMILY` of (sparsifier, sign election) pairs; each member is a
:class:`SparseTaskMerge`, called like any method. The sparsifiers, the tie / rounding conventions and the randomness
contract are in :mod:`evomerge.methods.sparsify`. ``normalize`` divides by the (agreeing) weights, see
:func:`~evomerge.methods.sparsify.disjoint_merge` and :func:`~evomerge.methods.linear.weighted_sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from evomerge.methods.linear import weighted_sum
from evomerge.methods.sparsify import (
    disjoint_merge,
    magnitude_band_prune_rows,
    magnitude_prune_rows,
    random_prune_rows,
    rank_random_prune_rows,
)

_TIES = 'Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS.'
_DARE = ('Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free '
         'Lunch", ICML.')
_BREADCRUMBS = ('Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", '
                'ECCV.')
_DELLA = ('Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based '
          'Sampling".')


@dataclass(frozen=True)
class SparseTaskMerge:
    """``θ0 + λ · merge(sparsify(θ_i − θ0))`` with ``merge`` = TIES disjoint merge (``sign_election``) or the
    weighted sum.

    ``sparsify(tau, **kwargs)`` maps the task vectors [N, *S] to the N sparsified rows; it receives every keyword
    argument beyond ``weight``, ``lam`` and ``normalize`` (its parameters, e.g. ``density``, and the inputs made
    beforehand: ``thresholds``, ``noise``, ``ranks``, or ``seed`` for a whole-tensor call). ``normalize``: the
    member's default when not given (mergekit's ``default_normalize``: only TIES and DELLA divide by the agreeing
    weights unless asked to).
    """

    name: str
    sparsify: Callable[..., Sequence[Tensor]]
    sign_election: bool
    normalize: bool
    doc: str

    def __call__(
        self, base: Tensor | None, sources: Tensor, *, weight: Tensor, lam: float = 1.0, normalize: bool | None = None,
        **sparsify_kwargs: object,
    ) -> Tensor:
        normalize = self.normalize if normalize is None else normalize
        if base is None:
            raise ValueError("sparsified task-vector merges (TIES/DARE/breadcrumbs/DELLA) need a base model")
        tau = self.sparsify(sources - base, **sparsify_kwargs)
        if self.sign_election:
            merged = disjoint_merge(tau, weight, normalize=normalize)
        else:
            merged = weighted_sum(tau, weight, normalize=normalize)
        return base + merged * lam  # multiply, then add: one rounding each in every kernel (eager or compiled)


#: The family: every member is one (sparsifier, sign election) pair.
FAMILY: tuple[SparseTaskMerge, ...] = (
    SparseTaskMerge("ties", magnitude_prune_rows, sign_election=True, normalize=True, doc=
                    "TIES-Merging: trim each task vector to its top-d magnitudes, elect signs, take the disjoint "
                    f"mean. {_TIES}"),
    SparseTaskMerge("dare_linear", random_prune_rows, sign_election=False, normalize=False, doc=
                    f"DARE + task arithmetic: drop entries with prob 1 − d, rescale by 1/d, weighted sum. {_DARE}"),
    SparseTaskMerge("dare_ties", random_prune_rows, sign_election=True, normalize=False, doc=
                    "DARE drop-and-rescale, then TIES sign election and disjoint merge (a sum by default; "
                    "normalize: true divides by the agreeing survivors' weights only, so the 1/d rescale is not "
                    f"averaged out and the task vector grows like 1/d: results/method_sweep.md). {_DARE}"),
    SparseTaskMerge("breadcrumbs", magnitude_band_prune_rows, sign_election=False, normalize=False, doc=
                    f"Model Breadcrumbs: drop the top-γ magnitudes, keep the next d, weighted sum. {_BREADCRUMBS}"),
    SparseTaskMerge("breadcrumbs_ties", magnitude_band_prune_rows, sign_election=True, normalize=False, doc=
                    f"Breadcrumbs masks, then TIES sign election and disjoint merge. {_BREADCRUMBS}"),
    SparseTaskMerge("della", rank_random_prune_rows, sign_election=True, normalize=True, doc=
                    "DELLA-Merging: magnitude-ranked random drop (keep prob in [d − ε, d + ε]), rescale 1/p, TIES "
                    f"election and disjoint merge. {_DELLA}"),
    SparseTaskMerge("della_linear", rank_random_prune_rows, sign_election=False, normalize=False, doc=
                    f"DELLA drop-and-rescale, then a plain weighted sum (no sign election). {_DELLA}"),
)
ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear = FAMILY
