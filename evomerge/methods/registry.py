"""Registry of merge methods: name -> function, parameters (defaults, valid ranges), requirements; validation.

Parameter names are mergekit's recipe keys ("weight", "density", "lambda", "t", "gamma", "epsilon", ...).
Per-source parameters reach the function as a float64 tensor [N] (the engine's; functions take any float
dtype and compute in float32); global ones as a python float / bool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import TypeVar

from torch import Tensor

from evomerge.methods.consensus import ram, ramplus_tl, sce
from evomerge.methods.fisher import fisher
from evomerge.methods.linear import linear, task_arithmetic
from evomerge.methods.model_stock import model_stock, model_stock_coefficients, model_stock_gram
from evomerge.methods.pairwise import arcee_fusion, nearswap
from evomerge.methods.regmean import regmean
from evomerge.methods.slerp import (
    multislerp,
    multislerp_coefficients,
    multislerp_gram,
    slerp,
    slerp_coefficients,
    slerp_gram,
)
from evomerge.methods.sparsify import (
    band_keep_counts,
    magnitude_band_prune_rows,
    magnitude_prune_rows,
    random_prune_rows,
    rank_random_prune_rows,
    ties_keep_count,
)
from evomerge.methods.sphere import karcher, nuslerp
from evomerge.methods.ties import FAMILY, SparseTaskMerge


class MethodError(ValueError):
    """A merge method or its parameters do not fit the recipe (unknown name, bad value, wrong sources)."""


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a merge method."""

    name: str  # recipe key, mergekit-compatible
    default: float | bool | None  # None = required
    low: float | None = None  # inclusive valid range, for validation and as default search range
    high: float | None = None
    per_source: bool = False  # True: one value per source -> Tensor[N]; False: global scalar
    kwarg: str | None = None  # python keyword if different from name (e.g. "lambda" -> "lam")
    doc: str = ""

    @property
    def key(self) -> str:
        """The keyword argument this parameter is passed as."""
        return self.kwarg or self.name

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)


# A cross-parameter check: (params with defaults filled in, n_sources) -> error message or None.
Constraint = Callable[[Mapping[str, object], int], str | None]
# Parameter points (recipe keys -> values; per-source values as lists) for a number of sources.
Points = list[dict[str, object]]


# ------------------------------------------------------------------------------ inputs a method declares
# What a method needs beyond base, sources and its parameters; the engine loops over ``MergeMethod.inputs``, makes
# each (once per tensor where it depends on the models only) and passes it as the keyword argument named here.
@dataclass(frozen=True)
class Draws:
    """Uniform draws per entry and source (:func:`~evomerge.methods.counter_rng.uniform_like` of the tensor's seed)
    as ``noise=`` [N, *S] or the matching slice; a whole-tensor call gets the tensor's ``seed=`` instead."""

    kwarg = "noise"


@dataclass(frozen=True)
class Thresholds:
    """Exact magnitude thresholds (:func:`~evomerge.methods.sparsify.kth_magnitudes` of the whole task vectors) for
    the keep counts ``counts(kwargs, numel)`` returns, as ``thresholds=`` (one [N] tensor per count)."""

    counts: Callable[[Mapping[str, object], int], tuple[Tensor, ...]]
    kwarg = "thresholds"


@dataclass(frozen=True)
class Ranks:
    """Relative magnitude ranks of the task vectors (:func:`~evomerge.methods.sparsify.relative_ranks` of the whole
    task vectors, [N, *S] or the matching slice) as ``ranks=``; they depend on the models only."""

    kwarg = "ranks"


@dataclass(frozen=True)
class Coefficients:
    """An angle-based combination (:mod:`evomerge.methods.angles`) as ``coefficients=``: ``gram(base, sources,
    kwargs)`` depends on the models and the method's flags only (computed once per tensor), ``combine(gram,
    kwargs)`` turns it into the coefficients of a candidate (entrywise when it has one row)."""

    gram: Callable[[Tensor | None, Tensor, Mapping[str, object]], Tensor]
    combine: Callable[[Tensor, Mapping[str, object]], Tensor]
    kwarg = "coefficients"


@dataclass(frozen=True)
class Statistic:
    """Data statistics of each source (``kind``: ``fisher`` diagonals or ``gram`` matrices of layer inputs,
    :mod:`evomerge.methods.statistics`) as ``stats=`` [N, ...]; None for a tensor without them."""

    kind: str
    kwarg = "stats"


MethodInput = Draws | Thresholds | Ranks | Coefficients | Statistic
_Input = TypeVar("_Input", Draws, Thresholds, Ranks, Coefficients, Statistic)



# --------------------------------------------------------------------------- baseline parameter points
#: Values that leave each task vector untouched (no trimming, no outlier drop, no spread, unit scale).
NEUTRAL: dict[str, object] = {"density": 1.0, "gamma": 0.0, "epsilon": 0.0, "lambda": 1.0}


def _one_hot(index: int, n_sources: int) -> dict[str, object]:
    return {"weight": [1.0 if i == index else 0.0 for i in range(n_sources)]}


def _uniform_weights(n_sources: int) -> Points:
    """Equal weights normalised, or ``w = 1/N`` unnormalised, or ``λ = 1/N`` (``θ0 + Σ (θ_i − θ0)/N = Σ θ_i / N``)."""
    ones, n = [1.0] * n_sources, float(n_sources)
    return [{"weight": ones, "normalize": True}, {"weight": [1.0 / n] * n_sources, "normalize": False},
            {"weight": ones, "normalize": False, "lambda": 1.0 / n}]


@dataclass(frozen=True)
class MergeMethod:
    """A per-tensor merge function and what it needs."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    min_sources: int = 1
    max_sources: int | None = None
    inputs: tuple[MethodInput, ...] = ()
    constraint: Constraint | None = None
    doc: str = ""
    # Entrywise: given its inputs (thresholds, draws, ranks, coefficients), output entry j depends only on entry j
    # of base and sources, so fn may be applied to any slice of the flattened entries (or to several tensors at once
    # when no per-tensor input is needed) with bit-identical results.
    elementwise: bool = False
    # Baseline points: parameter values under which fn returns source ``index`` unchanged (up to float rounding of
    # ``θ0 + (θ_i − θ0)``), and under which it is the uniform average ``Σ θ_i / N``; None when it cannot. Values the
    # points leave out are the neutral ones (:data:`NEUTRAL`). tests/test_space.py checks each on tensors.
    alone: Callable[[int, int], dict[str, object]] | None = None
    uniform: Callable[[int], Points] | None = None

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (recipe key); MethodError listing the valid ones if there is none."""
        for p in self.params:
            if p.name == name:
                return p
        valid = ", ".join(sorted(p.name for p in self.params))
        raise MethodError(f"unknown parameter {name!r} for method {self.name!r}; valid: {valid}")

    def needs(self, kind: type[_Input]) -> _Input | None:
        """The declared input of type ``kind``, or None."""
        return next((need for need in self.inputs if isinstance(need, kind)), None)

    @property
    def stochastic(self) -> bool:
        """Draws from the recipe's seed (DARE, DELLA)."""
        return self.needs(Draws) is not None

    @property
    def statistic(self) -> str | None:
        """The kind of data statistics the method needs (``fisher`` / ``gram``), or None."""
        need = self.needs(Statistic)
        return None if need is None else need.kind

    def whole_tensor_inputs(self, seed: int | None, stats: Tensor | None) -> dict[str, object]:
        """What a call on a whole tensor passes beside the parameters: the tensor's ``seed`` for a method with draws,
        ``stats`` for one with data statistics (the other inputs such a call computes itself)."""
        extra: dict[str, object] = {}
        if self.stochastic:
            extra["seed"] = seed
        if self.statistic:
            extra["stats"] = stats
        return extra

    def source_alone_points(self, index: int, n_sources: int) -> Points:
        """Parameter points under which the method returns source ``index`` alone (empty when it cannot)."""
        if self.alone is None or not self.min_sources <= n_sources <= (self.max_sources or n_sources):
            return []
        return [self._neutral(self.alone(index, n_sources))]

    def uniform_points(self, n_sources: int) -> Points:
        """Alternative parameter points under which the method is the uniform average (empty when it cannot)."""
        own = {p.name for p in self.params}
        points = [] if self.uniform is None else self.uniform(n_sources)
        return [self._neutral(point) for point in points if set(point) <= own]

    def _neutral(self, point: Mapping[str, object]) -> dict[str, object]:
        own = {p.name for p in self.params}
        return {**{k: v for k, v in NEUTRAL.items() if k in own}, **point}


def _leaves(value: object) -> list[object]:
    """Scalars inside a value: a scalar, a (nested) sequence of them (per source / per-layer gradient), a tensor, a
    per-filter mapping of any of those."""
    if isinstance(value, Tensor):
        return value.detach().flatten().tolist()
    if isinstance(value, Mapping):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _per_source_leaves(value: object, n_sources: int) -> list[list[float]]:
    """Numbers that apply to each source: a list of ``n_sources`` entries is read as one entry per source;
    anything else (scalar, gradient) applies to every source."""
    items = list(value) if isinstance(value, Tensor) and value.dim() > 0 else value
    if isinstance(items, Sequence) and not isinstance(items, str) and len(items) == n_sources:
        return [[float(x) for x in _leaves(item)] for item in items]
    numbers = [float(x) for x in _leaves(value)]
    return [numbers] * n_sources


_SLACK = 1e-6  # float rounding of sums like 0.9 + 0.1 (values may arrive as float32)


def _breadcrumbs_band(params: Mapping[str, object], n_sources: int) -> str | None:
    """gamma + density <= 1 per source (the kept band must fit in the tensor)."""
    gammas = _per_source_leaves(params["gamma"], n_sources)
    densities = _per_source_leaves(params["density"], n_sources)
    for i, (gamma, density) in enumerate(zip(gammas, densities)):
        if max(gamma) + max(density) > 1 + _SLACK:
            return (
                f"gamma + density must be <= 1 (drop the top gamma, keep the next density); source {i} has "
                f"gamma={max(gamma)} and density={max(density)}: lower one of them"
            )
    return None


def _della_window(params: Mapping[str, object], n_sources: int) -> str | None:
    """density ± epsilon within [0, 1] per source (keep probabilities range over [d − ε, d + ε])."""
    epsilons = _per_source_leaves(params["epsilon"], n_sources)
    densities = _per_source_leaves(params["density"], n_sources)
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
    steps = [float(x) for x in _leaves(params["max_iter"])]  # type: ignore[arg-type]
    if any(x != int(x) for x in steps):
        return f"max_iter must be a whole number of steps, got {steps}: search it with step: 1"
    return None


def _weight(low: float = 0.0, high: float = 2.0) -> Param:
    return Param("weight", 1.0, low, high, per_source=True, doc="relative weight of each source")


_DENSITY = Param("density", 1.0, 0.0, 1.0, per_source=True, doc="fraction of each task vector kept")
_LAMBDA = Param("lambda", 1.0, 0.0, 2.0, kwarg="lam", doc="scale of the merged task vector")
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
    after: tuple[Param, ...] = ()
    constraint: Constraint | None = None


_SPARSIFIERS: dict[Callable[..., object], _Sparsifier] = {
    magnitude_prune_rows: _Sparsifier((_DENSITY,), (Thresholds(_ties_counts),)),
    random_prune_rows: _Sparsifier((_DENSITY,), (Draws(),), after=(_RESCALE,)),
    magnitude_band_prune_rows: _Sparsifier(_BREADCRUMBS, (Thresholds(_band_counts),), constraint=_breadcrumbs_band),
    rank_random_prune_rows: _Sparsifier(_DELLA, (Draws(), Ranks()), after=(_RESCALE,), constraint=_della_window),
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
    )


_ALL: tuple[MergeMethod, ...] = (
    MergeMethod(
        "linear", linear, (_weight(), _normalize(True)), needs_base=False, elementwise=True,
        doc="weighted average of the sources (model soup)", alone=_one_hot, uniform=_uniform_weights,
    ),
    MergeMethod(
        "task_arithmetic", task_arithmetic,
        (_weight(-2.0, 2.0), _LAMBDA, _normalize(False)), needs_base=True, elementwise=True,
        doc="base + lambda * weighted sum of task vectors", alone=_one_hot, uniform=_uniform_weights,
    ),
    *(_family_method(member) for member in FAMILY),
    MergeMethod(
        "slerp", slerp, (Param("t", None, 0.0, 1.0, doc="interpolation factor: 0 -> first source, 1 -> second"),),
        needs_base=False, min_sources=2, max_sources=2, doc="spherical interpolation of two sources",
        elementwise=True, inputs=(Coefficients(slerp_gram, slerp_coefficients),),
        alone=lambda index, n_sources: {"t": float(index)},
    ),
    MergeMethod(
        "multislerp", multislerp, (_weight(),), needs_base=False, elementwise=True,
        inputs=(Coefficients(multislerp_gram, multislerp_coefficients),),
        doc="weighted spherical (Karcher) mean of the sources, or of task vectors when a base is given",
        alone=_one_hot,  # the Karcher mean of one point
    ),
    MergeMethod(
        "model_stock", model_stock,
        (Param("filter_wise", False, doc="one interpolation ratio per output row instead of per tensor"),),
        needs_base=True, min_sources=2, doc="average moved towards the base by the task vectors' angle",
        elementwise=True, inputs=(Coefficients(model_stock_gram, model_stock_coefficients),),
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
        doc="base, with the other model's entries where they are within t of the base's",
    ),
    MergeMethod(
        "arcee_fusion", arcee_fusion, (), needs_base=True, max_sources=1,
        doc="base, with the other model's changes where their importance is an outlier (median + 1.5 IQR)",
    ),
    MergeMethod(
        "sce", sce,
        (Param("select_topk", 1.0, 0.0, 1.0, doc="fraction of entries kept: those of largest variance across "
               "the task vectors"),),
        needs_base=True, doc="select by variance, weigh sources by mean squared change, erase minority signs",
    ),
    MergeMethod(
        "ram", ram, (_RAM_EPSILON,), needs_base=True,
        doc="changes made by one source kept, changes made by several averaged (Reinforced Agent Merging)",
    ),
    MergeMethod(
        "ramplus_tl", ramplus_tl,
        (Param("r", 0.1, 0.0, 2.0, doc="scale-up rate of a source's unique changes"),
         Param("alpha", 0.2, 0.0, 2.0, doc="cap of the shared / unique ratio in the scale-up"), _RAM_EPSILON),
        needs_base=True, doc="RAM with each source's unique changes scaled up by its overlap ratio (per tensor)",
    ),
    MergeMethod(
        "nuslerp", nuslerp,
        (Param("weight", None, 0.0, 2.0, per_source=True,
               doc="relative weight of each source: t = w_1 / (w_0 + w_1)"),
         Param("nuslerp_flatten", True, doc="one angle for the whole tensor (else per row / column)"),
         Param("nuslerp_row_wise", False, doc="without flatten: one angle per column (dim 0) instead of per row")),
        needs_base=False, min_sources=2, max_sources=2,
        doc="spherical interpolation of two models, or of their task vectors when a base is given",
    ),
    MergeMethod(
        "karcher", karcher,
        (Param("max_iter", 10, 1, 1000, doc="most Riemannian gradient steps"),
         Param("tol", 1e-5, 0.0, 1.0, doc="stop when the step is shorter; shorter inputs are left out")),
        needs_base=False, constraint=_whole_steps,
        doc="Karcher (Riemannian) mean of the sources' directions on the sphere, times their mean norm",
    ),
)

METHODS: dict[str, MergeMethod] = {method.name: method for method in (*_ALL, *_MERGEKIT_MORE)}


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; MethodError listing the valid names if unknown."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown merge method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


def _check_sources(method: MergeMethod, n_sources: int) -> None:
    low, high = method.min_sources, method.max_sources
    if low == high and n_sources != low:
        raise MethodError(f"{method.name} takes exactly {low} sources, got {n_sources}")
    if n_sources < low:
        raise MethodError(f"{method.name} takes at least {low} sources, got {n_sources}")
    if high is not None and n_sources > high:
        raise MethodError(f"{method.name} takes at most {high} sources, got {n_sources}")


def _check_value(method: MergeMethod, param: Param, value: object) -> None:
    for leaf in _leaves(value):
        if param.is_bool:
            if not isinstance(leaf, bool):
                raise MethodError(f"{method.name}: parameter {param.name!r} must be true or false, got {leaf!r}")
            continue
        if isinstance(leaf, bool) or not isinstance(leaf, Real):
            raise MethodError(f"{method.name}: parameter {param.name!r} must be a number, got {leaf!r}")
        low = -float("inf") if param.low is None else param.low
        high = float("inf") if param.high is None else param.high
        if not low <= float(leaf) <= high:
            raise MethodError(
                f"{method.name}: parameter {param.name!r} = {leaf} is out of range [{param.low}, {param.high}]"
            )


def validate_params(
    method: MergeMethod, params: Mapping[str, object], n_sources: int, has_base: bool, *, resolved: bool = True
) -> None:
    """Raise MethodError if ``params`` (recipe keys -> values) do not fit ``method`` with these sources.

    Checks: number of sources, base model present when needed, unknown and missing (required) parameters,
    value types and ranges, and cross-parameter constraints (breadcrumbs ``γ + d ≤ 1``, DELLA ``d ± ε`` in
    ``[0, 1]``). A value may be a scalar, a sequence (one entry per source and/or a per-layer gradient,
    possibly nested), a tensor or a per-filter mapping; every number in it is checked. ``resolved=False``: one
    scope of a recipe as written (before the values of a tensor are picked from scopes, filters and gradients):
    names, types and ranges only, no required-parameter or cross-parameter checks.
    """
    _check_sources(method, n_sources)
    if method.needs_base and not has_base:
        raise MethodError(
            f"{method.name} needs a base model (it merges task vectors θ_i − θ_base); set base_model in the recipe"
        )
    for name, value in params.items():
        _check_value(method, method.param(name), value)
    if not resolved:
        return
    missing = [p.name for p in method.params if p.default is None and p.name not in params]
    if missing:
        raise MethodError(f"{method.name}: missing required parameter(s) {', '.join(missing)}")
    if method.constraint is not None:
        filled = {p.name: params.get(p.name, p.default) for p in method.params}
        problem = method.constraint(filled, n_sources)
        if problem is not None:
            raise MethodError(f"{method.name}: {problem}")
