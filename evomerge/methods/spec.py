"""What a merge method declares: its parameters (names, defaults, valid ranges), the inputs the engine makes for it
(draws, thresholds, ranks, angle coefficients, data statistics), its baseline points; and the validation of
recipe values against a declaration. The table of declared methods is :mod:`evomerge.methods.registry`.

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


class MethodError(ValueError):
    """A merge method or its parameters do not fit the recipe (unknown name, bad value, wrong sources)."""


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a merge method."""

    name: str  # recipe key, mergekit-compatible
    default: float | bool | None  # None = required
    low: float | None = None  # inclusive range of a search space (default search range) and of a recipe, unless:
    high: float | None = None
    # the range a recipe may hold where it is wider (mergekit bounds no weight or lambda: nuslerp weight 2.5,
    # negative task-arithmetic weights are valid mergekit configs); (None, None): any number
    recipe_range: tuple[float | None, float | None] | None = None
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
    """An angle-based combination (SLERP, Model Stock) as ``coefficients=``: ``gram(base, sources,
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


@dataclass(frozen=True)
class SourceFactors:
    """The sources' LoRA factors instead of their dense tensors: ``fn(base, factors, *, transpose, <params>)`` with
    one ``(A, B, scale)`` per source (None where a source does not adapt the tensor); every source must be a LoRA
    adapter (:mod:`evomerge.engine.lowrank`)."""

    kwarg = "factors"


MethodInput = Draws | Thresholds | Ranks | Coefficients | Statistic | SourceFactors
_Input = TypeVar("_Input", Draws, Thresholds, Ranks, Coefficients, Statistic, SourceFactors)


# --------------------------------------------------------------------------- baseline parameter points
#: Values that leave each task vector untouched (no trimming, no outlier drop, no spread, unit scale).
NEUTRAL: dict[str, object] = {"density": 1.0, "gamma": 0.0, "epsilon": 0.0, "lambda": 1.0}


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
    # Peak bytes per entry of one call on a whole tensor, as (per source, once): the rows read as fp32 and stacked,
    # the base, the method's temporaries (task vectors, |τ|, masks, ranks, draws) and the result. What the streaming
    # merge holds for its largest tensor (evomerge.engine.memory.stream_working_set_bytes); an upper bound of the peak
    # measured with and without a base at 1..6 sources (tests/test_memory.py). None: not merged tensor by tensor from
    # dense rows (statistics, LoRA factors): the engine's formula estimate.
    whole_tensor_bytes: tuple[int, int] | None = None

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
    def takes_factors(self) -> bool:
        """Merges the sources' LoRA factors, not their dense tensors (LoraHub's composition)."""
        return self.needs(SourceFactors) is not None

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


def leaves(value: object) -> list[object]:
    """Scalars inside a value: a scalar, a (nested) sequence of them (per source / per-layer gradient), a tensor, a
    per-filter mapping of any of those."""
    if isinstance(value, Tensor):
        return value.detach().flatten().tolist()
    if isinstance(value, Mapping):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def per_source_leaves(value: object, n_sources: int) -> list[list[float]]:
    """Numbers that apply to each source: a list of ``n_sources`` entries is read as one entry per source;
    anything else (scalar, gradient) applies to every source."""
    items = list(value) if isinstance(value, Tensor) and value.dim() > 0 else value
    if isinstance(items, Sequence) and not isinstance(items, str) and len(items) == n_sources:
        return [[float(x) for x in leaves(item)] for item in items]
    numbers = [float(x) for x in leaves(value)]
    return [numbers] * n_sources


def _check_sources(method: MergeMethod, n_sources: int) -> None:
    low, high = method.min_sources, method.max_sources
    if low == high and n_sources != low:
        raise MethodError(f"{method.name} takes exactly {low} sources, got {n_sources}")
    if n_sources < low:
        raise MethodError(f"{method.name} takes at least {low} sources, got {n_sources}")
    if high is not None and n_sources > high:
        raise MethodError(f"{method.name} takes at most {high} sources, got {n_sources}")


def _check_value(method: MergeMethod, param: Param, value: object, recipe: bool) -> None:
    low, high = param.recipe_range if recipe and param.recipe_range is not None else (param.low, param.high)
    for leaf in leaves(value):
        if param.is_bool:
            if not isinstance(leaf, bool):
                raise MethodError(f"{method.name}: parameter {param.name!r} must be true or false, got {leaf!r}")
            continue
        if isinstance(leaf, bool) or not isinstance(leaf, Real):
            raise MethodError(f"{method.name}: parameter {param.name!r} must be a number, got {leaf!r}")
        if not (low is None or low <= float(leaf)) or not (high is None or float(leaf) <= high):
            raise MethodError(f"{method.name}: parameter {param.name!r} = {leaf} is out of range [{low}, {high}]")


def validate_params(
    method: MergeMethod, params: Mapping[str, object], n_sources: int, has_base: bool, *, resolved: bool = True,
    recipe: bool = False,
) -> None:
    """Raise MethodError if ``params`` (recipe keys -> values) do not fit ``method`` with these sources.

    Checks: number of sources, base model present when needed, unknown and missing (required) parameters,
    value types and ranges, and cross-parameter constraints (breadcrumbs ``γ + d ≤ 1``, DELLA ``d ± ε`` in
    ``[0, 1]``). A value may be a scalar, a sequence (one entry per source and/or a per-layer gradient,
    possibly nested), a tensor or a per-filter mapping; every number in it is checked. ``resolved=False``: one
    scope of a recipe as written (before the values of a tensor are picked from scopes, filters and gradients):
    names, types and ranges only, no required-parameter or cross-parameter checks. ``recipe``: the ranges a recipe
    may hold (``Param.recipe_range`` where set: any weight, as in mergekit), else those of a search space or sweep.
    """
    _check_sources(method, n_sources)
    if method.needs_base and not has_base:
        raise MethodError(
            f"{method.name} needs a base model (it merges task vectors θ_i − θ_base); set base_model in the recipe"
        )
    for name, value in params.items():
        _check_value(method, method.param(name), value, recipe)
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
