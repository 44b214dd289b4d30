"""The table of merge methods: name -> declaration (:class:`~evomerge.methods.spec.MergeMethod`: function,
parameters with defaults and valid ranges, inputs, baseline points, constraints), and the lookup."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from evomerge.methods.consensus import ram, ramplus_tl, sce
from evomerge.methods.fisher import fisher
from evomerge.methods.linear import linear, task_arithmetic
from evomerge.methods.lorahub import lorahub
from evomerge.methods.model_stock import model_stock, model_stock_coefficients, model_stock_gram
from evomerge.methods.pairwise import arcee_fusion, nearswap
from evomerge.methods.regmean import regmean
from evomerge.methods.slerp import slerp, slerp_coefficients, slerp_gram
from evomerge.methods.sparsify import (
    band_keep_counts,
    magnitude_band_prune_rows,
    magnitude_prune_rows,
    random_prune_rows,
    rank_random_prune_rows,
    ties_keep_count,
)
from evomerge.methods.spec import (
    Coefficients,
    Constraint,
    Draws,
    MergeMethod,
    MethodError,
    MethodInput,
    Param,
    Points,
    Ranks,
    SourceFactors,
    Statistic,
    Thresholds,
    leaves,
    per_source_leaves,
)
from evomerge.methods.sphere import MULTISLERP_EPS, karcher, multislerp, nuslerp
from evomerge.methods.ties import FAMILY, SparseTaskMerge


def _one_hot(index: int, n_sources: int) -> dict[str, object]:
    return {"weight": [1.0 if i == index else 0.0 for i in range(n_sources)]}


def _uniform_weights(n_sources: int) -> Points:
    """Equal weights normalised, or ``w = 1/N`` unnormalised, or ``λ = 1/N`` (``θ0 + Σ (θ_i − θ0)/N = Σ θ_i / N``)."""
    ones, n = [1.0] * n_sources, float(n_sources)
    return [{"weight": ones, "normalize": True}, {"weight": [1.0 / n] * n_sources, "normalize": False},
            {"weight": ones, "normalize": False, "lambda": 1.0 / n}]


_SLACK = 1e-6  # float rounding of sums like 0.9 + 0.1 (values may arrive as float32)


def _breadcrumbs_band(params: Mapping[str, object], n_sources: int) -> str | None:
    """gamma + density <= 1 per source (the kept band must fit in the tensor)."""
    gammas = per_source_leaves(params["gamma"], n_sources)
    densities = per_source_leaves(params["density"], n_sources)
    for i, (gamma, density) in enumerate(zip(gammas, densities)):
        if max(gamma) + max(density) > 1 + _SLACK:
            return (
                f"gamma + density must be <= 1 (drop the top gamma, keep the next density); source {i} has "
                f"gamma={max(gamma)} and density={max(density)}: lower one of them"
            )
    return None


def _della_window(params: Mapping[str, object], n_sources: int) -> str | None:
    """density ± epsilon within [0, 1] per source (keep probabilities range over [d − ε, d + ε])."""
    epsilons = per_source_leaves(params["epsilon"], n_sources)
    densities = per_source_leaves(params["density"], n_sources)
    for i, (epsilon, density) in enumerate(zip(epsilons, densities)):
        low, high = min(density) - max(epsilon), max(density) + max(epsilon)
        if low < -_SLACK or high > 1 + _SLACK:
            return (
                f"density ± epsilon must stay within [0, 1] (keep probabilities range over [d − ε, d + ε]); source"
                f" {i} spans [{low:g}, {high:g}] (density {density}, epsilon {epsilon}): lower epsilon"
            )
    return None


def _whole_steps(params: Mapping[str, object], n_sources: int) -> str | None:
    """karcher's max_iter is a whole number (mergekit refuses a fraction)."""
    steps = [float(x) for x in leaves(params["max_iter"])]  # type: ignore[arg-type]
    if any(x != int(x) for x in steps):
        return f"max_iter must be a whole number of steps, got {steps}: search it with step: 1"
    return None


_ANY = (None, None)  # a recipe may hold any number (mergekit bounds no weight or lambda)


def _weight(low: float = 0.0, high: float = 2.0) -> Param:
    return Param("weight", 1.0, low, high, per_source=True, recipe_range=_ANY, doc="relative weight of each source")


_DENSITY = Param("density", 1.0, 0.0, 1.0, per_source=True, doc="fraction of each task vector kept")
_LAMBDA = Param("lambda", 1.0, 0.0, 2.0, kwarg="lam", recipe_range=_ANY, doc="scale of the merged task vector")
_RESCALE = Param("rescale", True, doc="rescale survivors by 1/keep-probability")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, doc="divide by the sum of the (agreeing) weights")


_BREADCRUMBS = (
    Param("density", 0.9, 0.0, 1.0, per_source=True, doc="fraction kept below the dropped outliers"),
    Param("gamma", 0.01, 0.0, 1.0, per_source=True, doc="fraction of largest magnitudes dropped"),
)
_DELLA = (
    Param("density", 0.5, 0.0, 1.0, per_source=True, doc="mean keep probability"),
    Param("epsilon", 0.15, 0.0, 0.5, per_source=True, doc="keep probability spread: [d − ε, d + ε]"),
)


def _ties_counts(kwargs: Mapping[str, object], numel: int) -> tuple[Tensor, ...]:
    return (ties_keep_count(kwargs["density"], numel),)  # type: ignore[arg-type]


def _band_counts(kwargs: Mapping[str, object], numel: int) -> tuple[Tensor, ...]:
    return band_keep_counts(kwargs["density"], kwargs["gamma"], numel)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Sparsifier:
    """What a sparsifier of the TIES family brings to a method: its parameters (``after``: those listed after
    ``normalize``, as mergekit lists them), the inputs it reads, its cross-parameter constraint."""

    params: tuple[Param, ...]
    inputs: tuple[MethodInput, ...]
    whole_tensor_bytes: tuple[int, int]  # MergeMethod.whole_tensor_bytes of every member (the sign election included)
    after: tuple[Param, ...] = ()
    constraint: Constraint | None = None


_SPARSIFIERS: dict[Callable[..., object], _Sparsifier] = {
    magnitude_prune_rows: _Sparsifier((_DENSITY,), (Thresholds(_ties_counts),), (20, 20)),
    random_prune_rows: _Sparsifier((_DENSITY,), (Draws(),), (24, 16), after=(_RESCALE,)),
    magnitude_band_prune_rows: _Sparsifier(_BREADCRUMBS, (Thresholds(_band_counts),), (20, 16),  # the _ties one
                                           constraint=_breadcrumbs_band),
    # the ranks' int64 keys and run starts of one row (33 B per entry) dominate at one source, the draws beyond
    rank_random_prune_rows: _Sparsifier(_DELLA, (Draws(), Ranks()), (28, 29), after=(_RESCALE,),
                                        constraint=_della_window),
}


def _family_method(member: SparseTaskMerge) -> MergeMethod:
    """The registry entry of a member of the TIES family (:data:`evomerge.methods.ties.FAMILY`): its parameters,
    inputs and constraint come from its sparsifier; a weighted sum (no sign election) can express the uniform
    average, and with one-hot weights every member returns the source alone (zero contributions never agree)."""
    sparsifier = _SPARSIFIERS[member.sparsify]
    return MergeMethod(
        member.name, member, (_weight(), *sparsifier.params, _normalize(member.normalize), *sparsifier.after, _LAMBDA),
        needs_base=True, inputs=sparsifier.inputs, constraint=sparsifier.constraint, doc=member.doc.split(". ")[0],
        elementwise=True, alone=_one_hot, uniform=None if member.sign_election else _uniform_weights,
        whole_tensor_bytes=sparsifier.whole_tensor_bytes,
    )


_ALL: tuple[MergeMethod, ...] = (
    MergeMethod(
        "linear", linear, (_weight(), _normalize(True)), needs_base=False, elementwise=True,
        doc="weighted average of the sources (model soup)", alone=_one_hot, uniform=_uniform_weights,
        whole_tensor_bytes=(8, 12),
    ),
    MergeMethod(
        "task_arithmetic", task_arithmetic,
        (_weight(-2.0, 2.0), _LAMBDA, _normalize(False)), needs_base=True, elementwise=True,
        doc="base + lambda * weighted sum of task vectors", alone=_one_hot, uniform=_uniform_weights,
        whole_tensor_bytes=(14, 6),
    ),
    *(_family_method(member) for member in FAMILY),
    MergeMethod(
        "slerp", slerp, (Param("t", None, 0.0, 1.0, doc="interpolation factor: 0 -> first source, 1 -> second"),),
        needs_base=False, min_sources=2, max_sources=2, doc="spherical interpolation of two sources",
        elementwise=True, inputs=(Coefficients(slerp_gram, slerp_coefficients),),
        alone=lambda index, n_sources: {"t": float(index)}, whole_tensor_bytes=(8, 8),
    ),
    MergeMethod(
        "multislerp", multislerp,
        (_weight(),
         Param("normalize_weights", True, doc="divide the weights by their sum"),
         Param("eps", MULTISLERP_EPS, 0.0, 1.0,
               doc="added to every norm divided by; a mean direction shorter than it is degenerate")),
        needs_base=False,
        doc="mergekit's multi-SLERP: the renormalised weighted mean of the sources' (or task vectors') directions "
            "at their weighted mean norm",
        whole_tensor_bytes=(16, 4),
    ),
    MergeMethod(
        "model_stock", model_stock,
        (Param("filter_wise", False, doc="one interpolation ratio per output row instead of per tensor"),),
        needs_base=True, min_sources=2, doc="average moved towards the base by the task vectors' angle",
        elementwise=True, inputs=(Coefficients(model_stock_gram, model_stock_coefficients),),
        whole_tensor_bytes=(8, 12),
    ),
    MergeMethod(
        "fisher", fisher,
        (_weight(), Param("fisher_floor", 1e-6, 0.0, 1.0, doc="Fisher floor, relative to the tensor's mean Fisher")),
        needs_base=False, inputs=(Statistic("fisher"),), doc="Fisher-weighted average (diagonal Fisher per source)",
        alone=_one_hot,  # zero importance for the others
    ),
    MergeMethod(
        "regmean", regmean,
        (Param("alpha", 0.9, 0.0, 1.0, doc="scale of the Gram matrices' off-diagonal entries"),),
        needs_base=False, inputs=(Statistic("gram"),),
        doc="least-squares merge of linear layers from input Gram matrices",
    ),
)

_RAM_EPSILON = Param("epsilon", 1e-5, 0.0, 1.0, doc="a task vector entry counts as changed when |τ| > epsilon")

# mergekit's methods beyond the classic ones (mergekit 0.1.5 registry; parameter names and defaults as there)
_MERGEKIT_MORE: tuple[MergeMethod, ...] = (
    MergeMethod(
        "nearswap", nearswap,
        (Param("t", None, 0.0, None, doc="entries closer than t to the base's take the other model's value"),),
        needs_base=True, max_sources=1, elementwise=True,
        doc="base, with the other model's entries where they are within t of the base's", whole_tensor_bytes=(8, 16),
    ),
    MergeMethod(
        "arcee_fusion", arcee_fusion, (), needs_base=True, max_sources=1,
        doc="base, with the other model's changes where their importance is an outlier (median + 1.5 IQR)",
        whole_tensor_bytes=(16, 16),
    ),
    MergeMethod(
        "sce", sce,
        (Param("select_topk", 1.0, 0.0, 1.0, doc="fraction of entries kept: those of largest variance across "
               "the task vectors"),),
        needs_base=True, doc="select by variance, weigh sources by mean squared change, erase minority signs",
        whole_tensor_bytes=(17, 12),
    ),
    MergeMethod(
        "ram", ram, (_RAM_EPSILON,), needs_base=True,
        doc="changes made by one source kept, changes made by several averaged (Reinforced Agent Merging)",
        whole_tensor_bytes=(25, 26),
    ),
    MergeMethod(
        "ramplus_tl", ramplus_tl,
        (Param("r", 0.1, 0.0, 2.0, doc="scale-up rate of a source's unique changes"),
         Param("alpha", 0.2, 0.0, 2.0, doc="cap of the shared / unique ratio in the scale-up"), _RAM_EPSILON),
        needs_base=True, doc="RAM with each source's unique changes scaled up by its overlap ratio (per tensor)",
        whole_tensor_bytes=(25, 26),
    ),
    MergeMethod(
        "nuslerp", nuslerp,
        (Param("weight", None, 0.0, 2.0, per_source=True, recipe_range=_ANY,
               doc="relative weight of each source: t = w_1 / (w_0 + w_1)"),
         Param("nuslerp_flatten", True, doc="one angle for the whole tensor (else per row / column)"),
         Param("nuslerp_row_wise", False, doc="without flatten: one angle per column (dim 0) instead of per row")),
        needs_base=False, min_sources=2, max_sources=2,
        doc="spherical interpolation of two models, or of their task vectors when a base is given",
        whole_tensor_bytes=(12, 20),
    ),
    MergeMethod(
        "karcher", karcher,
        (Param("max_iter", 10, 1, 1000, doc="most Riemannian gradient steps"),
         Param("tol", 1e-5, 0.0, 1.0, doc="stop when the step is shorter; shorter inputs are left out")),
        needs_base=False, constraint=_whole_steps,
        doc="Karcher (Riemannian) mean of the sources' directions on the sphere, times their mean norm",
        whole_tensor_bytes=(8, 24),
    ),
)

_LORA: tuple[MergeMethod, ...] = (
    MergeMethod(
        "lorahub", lorahub,
        (_weight(-1.5, 1.5), Param("rank_sum", False, doc="exact Σ w_i s_i B_i A_i instead of LoraHub's factor sums")),
        needs_base=True, inputs=(SourceFactors(),),
        doc="LoraHub composition of LoRA adapter sources (evomerge.methods.lorahub)", alone=_one_hot,
    ),
)

METHODS: dict[str, MergeMethod] = {method.name: method for method in (*_ALL, *_MERGEKIT_MORE, *_LORA)}


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; MethodError listing the valid names if unknown."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown merge method {name!r}; valid: {', '.join(sorted(METHODS))}") from None

