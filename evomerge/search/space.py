"""Search spaces: a declarative YAML file -> Optuna suggestions (define-by-run) -> a :class:`~evomerge.recipe.Recipe`.

Three kinds, behind one facade (:class:`SearchSpace`): parameter spaces and the layer-stacking space (below), and
mixture-of-experts spaces (``kind: moe``, :mod:`evomerge.search.moe_space`), which search around the run's MoE
template.

A search space says which merge recipes a study may propose. :meth:`SearchSpace.suggest` asks an Optuna trial for
every searched value and assembles the recipe; :meth:`SearchSpace.baseline_params` gives the trial parameters of
the reference points a study is seeded with. The space never touches tensors; it only writes recipes.

Parameter spaces (every method except ``passthrough``)
------------------------------------------------------
::

    method: dare_ties                  # a registered method (evomerge.methods.METHODS) ...
    # method: {choice: [ties, dare_ties, task_arithmetic]}   # ... or a searched choice (trial param "method")
    layer_groups: 4                    # N groups of consecutive layers, "all" (one per layer) or 1 (default)
    layer_profile: step                # step (default) | gradient: how group values cover the layer stack
    filters: [self_attn, mlp]          # optional: separate values per filter; other tensors take "default"
    parameters:                        # one entry per method parameter (registry name); unlisted ones keep
      weight: {low: 0.0, high: 1.0}    #   the registry default and are not searched
      density: search                  # the registry's valid range [low, high]
      lambda: 1.0                      # fixed
      normalize: {choice: [true, false]}
    method_parameters:                 # only with a method choice: per-method entries, override `parameters`
      task_arithmetic: {lambda: {low: 0.5, high: 1.5}}
    penalty: {l1: 0.05}                # optional: objective = score ∓ l1 · Σ|w| over the searched weights

A parameter entry is one of

- ``search``: a float searched over the registry's valid range ``[low, high]`` (booleans: ``{choice: [false,
  true]}``); an error if the registry gives no range;
- ``{low: a, high: b, log: false, step: s, layerwise: ...}``: a float suggestion (``trial.suggest_float``); ``low`` and
  ``high`` default to the registry's range, which they must lie within; ``log`` needs ``low > 0``;
- ``{choice: [v1, v2, ...], layerwise: ...}``: a categorical suggestion (numbers or booleans);
- a fixed value: a scalar, a gradient list, or ``{value: <any recipe parameter value>}`` (e.g. a filter mapping).

Which parameters vary over the layer stack (``layerwise``): per-source parameters (``weight``, ``density``, ``gamma``,
``epsilon``) are searched per source × layer group × filter by default; global parameters (``lambda``, ``t``,
``alpha``, ...) are one value unless ``layerwise: true`` asks for one per group × filter (e.g. a slerp ``t``
gradient). ``layerwise: false`` on a per-source parameter gives one value per source. Booleans are never layerwise.

Layer groups: with ``G`` groups (``min(G, num_layers)``; ``all`` = ``num_layers``) layer ``l`` of ``L`` belongs to
group ``floor(l·G/L)``. A layerwise value becomes, per filter,

- ``step``: a list of exactly ``L`` values, layer ``l`` taking its group's value (a list of ``L`` values gives each
  layer its own value exactly, see :func:`evomerge.recipe.interpolate`); a scalar when ``G = 1``;
- ``gradient``: the ``G`` group values as gradient anchors, interpolated linearly across the stack (mergekit).

Tensors outside the stack (embeddings, final norm, head) take the value at its start, as in mergekit. With ``filters``
the value is ``{f1: ..., f2: ..., default: ...}``; ``default`` (also searched) covers every tensor no filter matches.

Trial parameter names say what a value is, so that optuna-dashboard and importances read without evomerge:
``<param>[<source>][<filter>][<layers>]``, e.g. ``weight[expert_math][layers 8-15]``,
``density[expert_math][mlp][layers 0-7]``, ``lambda``, ``t[self_attn][layer 3]``. ``<source>`` is the source's label
(:func:`~evomerge.recipe.schema.model_labels`; ``<index>:<label>`` where a source is listed twice); ``<layers>`` is
the layer range of the group (left out with one group), ``at layer <x>`` for a gradient anchor (anchor ``g`` of
``G`` sits at layer ``g·(L − 1)/(G − 1)``). With a method choice the method's parameters are prefixed by its name
(``dare_ties/density[expert_math][layers 0-7]``) so that each method's values are modelled separately, and
``method`` holds the choice.

Studies written before these names (naming version 1; :data:`NAMING` is today's) keep theirs:
``<param>[/s<source index>][/g<group>][/<filter>]`` (``weight/s0/g1/mlp``); the run passes the study's version
(study user_attr ``param_naming``, :func:`evomerge.search.trials.param_naming`) to :meth:`SearchSpace.suggest`, so a
resumed study goes on with the names its trials have.

L1 penalty (``penalty: {l1: α}``): LoraHub's regularizer (Huang et al. 2023, "LoraHub: Efficient Cross-Task
Generalization via Dynamic LoRA Composition": the weights minimize ``L + α Σ_i |w_i|``, α = 0.05) folded into the
objective a trial records: ``score − α Σ|w|`` when the study maximizes, ``score + α Σ|w|`` when it minimizes, the
sum over the trial's searched ``weight`` values (every ``weight[...]`` parameter; others are not penalized). The
trial keeps its unpenalized score (user_attr ``score``, :mod:`evomerge.search.trials`) and the report shows both;
test-split scores are unpenalized. Every method of the space must search ``weight`` (not fixed), and the run must
have one objective. (LoraHub's released code, ``lorahub/algorithm.py``, divides the sum by the number of adapters:
``l1: 0.05 / N`` reproduces that.)

Checked at load, with an error naming the file, the entry and the fix: unknown keys, unknown methods or parameters,
ranges outside the registry's valid range, booleans searched as floats, a missing required parameter (slerp ``t``),
and method constraints (breadcrumbs ``γ + d ≤ 1``, DELLA ``d ± ε`` within ``[0, 1]``) at the ends of the ranges.

Layer-stacking space (``method: passthrough``)
----------------------------------------------
Sakana AI's data-flow space (Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes",
arXiv:2403.13187): a searched path through the layers of the sources, each used layer scaled::

    method: passthrough
    max_layers: 1.5x        # output slots: an int, or a multiple of the sources' depth ("2x"); default "1x"
    window: 2               # optional: slot k may only take layers within ±window of its place in the stack
    scale: {low: 0.5, high: 1.5}   # per-slot scale: range, choice or fixed (default 1.0); must be >= 0

Slot ``k`` (trial param ``slot/<k>``) is a categorical choice of ``"s<i>/l<j>"`` (layer ``j`` of source ``i``) or
``"skip"`` (slot 0 never skips, so a path is never empty); a used slot gets a scale (``scale/<k>``). Slot ``k`` of
``K`` sits at layer ``c_k = round(k·(L − 1)/(K − 1))`` of the sources' stack; ``window`` restricts around it. The
path becomes ``StackRecipe(slices=[...])``, adjacent slots of one source with consecutive layers and
equal scales merged into one slice; embeddings and head come from the model set's base, else from the first slice's
model (:mod:`evomerge.engine.stacking`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import optuna
from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)

from evomerge.methods import MergeMethod, MethodError, Param, get_method, validate_params
from evomerge.recipe import AnyRecipe, LayerSlice, MoeRecipe, ParamValue, Recipe, Scalar, SourceSpec, StackRecipe
from evomerge.recipe.schema import STACK_METHOD, StrictModel, model_labels, one_line
from evomerge.yamlfile import load_yaml

if TYPE_CHECKING:
    from evomerge.search.moe_space import MoeSpace

log = logging.getLogger(__name__)

Cell = tuple[Union[int, None], Union[str, None]]  # (layer group, filter) of one searched value; None = not split
#: The trial parameter naming new studies get (module docstring); 1: the index names of studies written before it.
NAMING = 2
_UNION_TAGS = ("range", "choice", "fixed", "function-before")  # pydantic's union tags in error locations: no keys


class SpaceError(ValueError):
    """A search space that cannot be used (bad file, or a model set it cannot merge); the message says the fix."""


@dataclass(frozen=True)
class ModelSet:
    """Which checkpoints a search merges: an optional base, the sources, and their number of layers; for an MoE
    search the template recipe too (its base and experts are ``base`` and ``sources``)."""

    base: str | None
    sources: list[str]
    num_layers: int
    template: MoeRecipe | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise SpaceError("a model set needs at least one source")
        if self.num_layers < 1:
            raise SpaceError(f"num_layers must be >= 1, got {self.num_layers}")


class _NoFit(Exception):
    """A baseline the space cannot express; the message says why."""


# --------------------------------------------------------------------------------------------- value specs
class RangeSpec(StrictModel):
    """A float searched in ``[low, high]`` (``trial.suggest_float``); bounds default to the registry's."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    layerwise: bool | None = None

    def contains(self, value: object) -> bool:
        """Whether Optuna accepts ``value`` for this range (same step tolerance as ``FloatDistribution``)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-8

    def describe(self) -> str:
        return f"range [{self.low}, {self.high}]" + (f" step {self.step}" if self.step else "")


class ChoiceSpec(StrictModel):
    """A categorical choice among numbers or booleans (``trial.suggest_categorical``)."""

    choice: list[Scalar] = Field(min_length=1)
    layerwise: bool | None = None

    def contains(self, value: object) -> bool:
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choice)

    def describe(self) -> str:
        return f"choice {self.choice}"


class FixedSpec(StrictModel):
    """A fixed recipe value (scalar, gradient list or per-filter mapping); not searched."""

    value: ParamValue

    def leaves(self) -> list[Scalar]:
        """Every scalar inside the value."""
        value = self.value
        entries = list(value.values()) if isinstance(value, dict) else [value]
        return [x for e in entries for x in (e if isinstance(e, list) else [e])]


def _spec_kind(raw: Any) -> str:
    if isinstance(raw, dict):
        return "choice" if "choice" in raw else "fixed" if "value" in raw else "range"
    return {ChoiceSpec: "choice", FixedSpec: "fixed"}.get(type(raw), "range")


def _spec_shorthand(raw: Any) -> Any:
    """``search`` -> the registry range; a bare scalar or list -> a fixed value."""
    if raw == "search":
        return {}
    if isinstance(raw, (bool, int, float, list)):
        return {"value": raw}
    if isinstance(raw, str):
        raise ValueError(
            f"{raw!r} is not a parameter entry: write 'search', a fixed number, {{low: a, high: b}} or "
            "{choice: [...]}"
        )
    return raw


ParamSpec = Annotated[
    Union[Annotated[RangeSpec, Tag("range")], Annotated[ChoiceSpec, Tag("choice")], Annotated[FixedSpec, Tag("fixed")]],
    Discriminator(_spec_kind),
    BeforeValidator(_spec_shorthand),
]
Searched = Union[RangeSpec, ChoiceSpec]


class MethodChoice(StrictModel):
    """``method: {choice: [...]}``: the method is a searched categorical."""

    choice: list[str] = Field(min_length=1)


class Penalty(StrictModel):
    """``penalty: {l1: α}``: an L1 penalty on a trial's searched per-source weights (module docstring)."""

    l1: float = Field(ge=0)

    def amount(self, weights: Sequence[float]) -> float:
        """``α Σ_i |w_i|`` (Huang et al. 2023, LoraHub: the weights minimize ``L + α Σ_i |w_i|``)."""
        return self.l1 * sum(abs(float(w)) for w in weights)


def penalized(score: float, amount: float, direction: str) -> float:
    """The objective of a penalized trial: ``score − amount`` when the study maximizes (``direction`` ``"maximize"``),
    ``score + amount`` when it minimizes: the penalty always makes the objective worse."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    return score - amount if direction == "maximize" else score + amount


# -------------------------------------------------------------------------------------------- layer layout
@dataclass(frozen=True)
class _Layout:
    """How one searched parameter's values spread over the layer stack: ``groups`` × ``filters`` cells."""

    groups: int | None  # None: not layerwise (one cell)
    filters: tuple[str, ...]  # () or (*filters, "default")
    num_layers: int
    gradient: bool

    def cells(self) -> list[Cell]:
        if self.groups is None:
            return [(None, None)]
        return [(g, f) for g in range(self.groups) for f in (self.filters or (None,))]

    def suffix(self, cell: Cell, naming: int) -> str:
        """The part of a trial parameter name that says which layers and tensors ``cell`` covers."""
        group, filter_ = cell
        if naming == 1:
            return ("" if group is None else f"/g{group}") + ("" if filter_ is None else f"/{filter_}")
        return ("" if filter_ is None else f"[{filter_}]") + ("" if group is None else self.layers(group))

    def layers(self, group: int) -> str:
        """``[layers a-b]`` (``[layer a]``) of a step group, ``[at layer x]`` of a gradient anchor, ``""`` when one
        group covers the whole stack."""
        groups = self.groups or 1
        if groups == 1:
            return ""
        if self.gradient:  # anchors spread evenly over positions 0..1, i.e. layers 0..L-1 (>= 1 layer apart)
            return f"[at layer {round(group * (self.num_layers - 1) / (groups - 1), 1):g}]"
        members = [layer for layer in range(self.num_layers) if layer * groups // self.num_layers == group]
        first, last = members[0], members[-1]
        return f"[layer {first}]" if first == last else f"[layers {first}-{last}]"

    def assemble(self, values: Mapping[Cell, Scalar]) -> ParamValue:
        """The recipe value of one parameter from its cell values (module docstring: step / gradient)."""
        if self.groups is None:
            return values[(None, None)]

        def profile(filter_: str | None) -> Scalar | list[float]:
            per_group = [values[(g, filter_)] for g in range(self.groups or 1)]
            if len(per_group) == 1:
                return per_group[0]
            if self.gradient:
                return [float(v) for v in per_group]
            return [float(per_group[layer * len(per_group) // self.num_layers]) for layer in range(self.num_layers)]

        if not self.filters:
            return profile(None)
        return {f: profile(f) for f in self.filters}


def _check_models(method: MergeMethod, models: ModelSet) -> None:
    n = len(models.sources)
    if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
        low, high = method.min_sources, method.max_sources
        takes = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise SpaceError(
            f"method {method.name} takes {takes} sources, the model set has {n}: "
            "change the sources of the run or the space's method"
        )
    if method.needs_base and models.base is None:
        raise SpaceError(f"method {method.name} merges task vectors θ_i − θ_base: give the run a base model")


# ------------------------------------------------------------------------------------------ merge space
class MergeSpace(StrictModel):
    """A parameter space over one method or a choice of methods (module docstring)."""

    method: Union[str, MethodChoice]
    layer_groups: Union[Annotated[int, Field(ge=1)], Literal["all"]] = 1
    layer_profile: Literal["step", "gradient"] = "step"
    filters: list[str] = Field(default_factory=list)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    method_parameters: dict[str, dict[str, ParamSpec]] = Field(default_factory=dict)
    penalty: Penalty | None = None

    _plans: dict[str, dict[str, ParamSpec]] = PrivateAttr(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.method.choice) if isinstance(self.method, MethodChoice) else [self.method]

    @property
    def is_choice(self) -> bool:
        return isinstance(self.method, MethodChoice)

    @model_validator(mode="after")
    def _resolve(self) -> MergeSpace:
        methods = self.methods
        if len(set(methods)) != len(methods):
            raise ValueError(f"method choice lists a method twice: {methods}")
        if STACK_METHOD in methods:
            raise ValueError("passthrough is a layer-stacking space of its own: write `method: passthrough` alone")
        registered = {m: get_method(m) for m in methods}
        if len(set(self.filters)) != len(self.filters) or "default" in self.filters or "" in self.filters:
            raise ValueError(f"filters must be distinct names other than 'default' (always added), got {self.filters}")
        if self.method_parameters and not self.is_choice:
            raise ValueError("method_parameters is for a method choice; with one method write everything in parameters")
        for name in self.method_parameters:
            if name not in registered:
                raise ValueError(f"method_parameters names {name!r}, which is not among the choices {methods}")
        unused = [p for p in self.parameters if not any(p in {q.name for q in m.params} for m in registered.values())]
        if unused:
            valid = sorted({q.name for m in registered.values() for q in m.params})
            raise ValueError(f"unknown parameter(s) {unused} for method(s) {methods}; valid: {', '.join(valid)}")
        for name, method in registered.items():
            own = {p.name for p in method.params}
            entries = {k: v for k, v in self.parameters.items() if k in own} | self.method_parameters.get(name, {})
            plan = {p.name: _resolve_spec(method, p, entries[p.name])
                    for p in method.params if p.name in entries}
            _check_against_registry(method, plan)
            self._plans[name] = plan
            if self.penalty is not None and not isinstance(plan.get("weight"), (RangeSpec, ChoiceSpec)):
                raise ValueError(
                    f"penalty: the L1 penalty is on the searched per-source weights, and method {name} searches none "
                    "(give parameters.weight a range, e.g. {low: -1.5, high: 1.5}, or drop penalty)")
        return self

    # ------------------------------------------------------------------------------------------ queries
    def is_continuous(self) -> bool:
        return not self.is_choice and not any(
            isinstance(s, ChoiceSpec) for plan in self._plans.values() for s in plan.values()
        )

    def _layout(self, spec: ParamSpec, models: ModelSet) -> _Layout:
        layerwise = bool(getattr(spec, "layerwise", False))
        groups = models.num_layers if self.layer_groups == "all" else min(self.layer_groups, models.num_layers)
        return _Layout(groups if layerwise else None, (*self.filters, "default") if self.filters else (),
                       models.num_layers, self.layer_profile == "gradient")

    def _names(
        self, method: str, param: Param, spec: ParamSpec, models: ModelSet, naming: int
    ) -> list[tuple[int | None, Cell, str]]:
        """(source index or None, cell, trial param name) of every searched value of ``param`` (module docstring)."""
        prefix = f"{method}/" if self.is_choice else ""
        layout = self._layout(spec, models)
        sources: list[int | None] = list(range(len(models.sources))) if param.per_source else [None]
        labels = _source_names(models.sources, naming)
        return [(i, cell, f"{prefix}{param.name}{'' if i is None else labels[i]}{layout.suffix(cell, naming)}")
                for i in sources for cell in layout.cells()]

    # ---------------------------------------------------------------------------------------- suggestion
    def suggest(self, trial: optuna.Trial, models: ModelSet, naming: int = NAMING) -> Recipe:
        for name in self.methods:
            _check_models(get_method(name), models)
        name = trial.suggest_categorical("method", self.methods) if self.is_choice else self.methods[0]
        method = get_method(name)
        per_source: list[dict[str, ParamValue]] = [{} for _ in models.sources]
        shared: dict[str, ParamValue] = {}
        for pname, spec in self._plans[name].items():
            param = method.param(pname)
            if isinstance(spec, FixedSpec):
                shared[pname] = spec.value
                continue
            cells: dict[int | None, dict[Cell, Scalar]] = {}
            for i, cell, trial_name in self._names(name, param, spec, models, naming):
                cells.setdefault(i, {})[cell] = _suggest_one(trial, trial_name, spec)
            layout = self._layout(spec, models)
            for i, values in cells.items():
                (shared if i is None else per_source[i])[pname] = layout.assemble(values)
        return Recipe(
            method=name, base=models.base, parameters=shared,
            sources=[SourceSpec(model=m, parameters=p) for m, p in zip(models.sources, per_source)],
        )

    def penalty_of(self, params: Mapping[str, Any], models: ModelSet, naming: int = NAMING) -> float | None:
        """The L1 penalty ``α Σ|w|`` of a trial whose parameters are ``params`` (its searched ``weight`` values),
        None when the space has no ``penalty``."""
        if self.penalty is None:
            return None
        name = str(params["method"]) if self.is_choice else self.methods[0]
        spec = self._plans[name]["weight"]
        names = self._names(name, get_method(name).param("weight"), spec, models, naming)
        return self.penalty.amount([params[trial_name] for _, _, trial_name in names])

    # ----------------------------------------------------------------------------------------- baselines
    def baseline_params(self, models: ModelSet, naming: int = NAMING) -> list[tuple[str, dict[str, Any]]]:
        n = len(models.sources)
        wanted: list[tuple[str, list[tuple[str, dict[str, object]]]]] = []
        for i, label in enumerate(model_labels(models.sources)):
            wanted.append((f"source:{label}", [(m, t) for m in self.methods
                                               for t in get_method(m).source_alone_points(i, n)]))
        wanted.append(("uniform", [(m, t) for m in self.methods for t in get_method(m).uniform_points(n)]))
        for m in self.methods:
            defaults = {p.name: p.default for p in get_method(m).params}
            required = [k for k, v in defaults.items() if v is None]
            if required:
                log.debug("baseline defaults of %s skipped: no registry default for %s", m, ", ".join(required))
            else:
                wanted.append(("defaults" + (f":{m}" if self.is_choice else ""), [(m, defaults)]))
        out: list[tuple[str, dict[str, Any]]] = []
        for label, candidates in wanted:
            reasons = []
            for method, target in candidates:
                try:
                    out.append((label, self._fit(method, target, models, naming)))
                    break
                except _NoFit as why:
                    reasons.append(f"{method}: {why}")
            else:
                log.debug("baseline %s skipped: %s", label,
                          "; ".join(reasons) or f"not expressible exactly with {', '.join(self.methods)}")
        return out

    def _fit(self, name: str, target: Mapping[str, object], models: ModelSet, naming: int) -> dict[str, Any]:
        """Trial params that make :meth:`suggest` give ``target`` (per-source values as lists; absent = any)."""
        method = get_method(name)
        try:
            _check_models(method, models)
        except SpaceError as err:
            raise _NoFit(str(err)) from None
        params: dict[str, Any] = {"method": name} if self.is_choice else {}
        for param in method.params:
            want = target.get(param.name)
            spec = self._plans[name].get(param.name)
            if spec is None or isinstance(spec, FixedSpec):
                held = [param.default] if spec is None else spec.leaves()
                wanted = [] if want is None else want if isinstance(want, list) else [want]
                if any(w != h for w in wanted for h in held):
                    how = f"leaves it at its default {param.default}" if spec is None else f"fixes it at {spec.value}"
                    raise _NoFit(f"needs {param.name} = {want}; the space {how}")
                continue
            for i, _, trial_name in self._names(name, param, spec, models, naming):
                value = want[i] if isinstance(want, list) and i is not None else want
                value = _any_value(spec, param) if value is None else value
                if not spec.contains(value):
                    raise _NoFit(f"needs {trial_name} = {value}, outside the space's {spec.describe()}")
                params[trial_name] = value
        return params


def _source_names(sources: Sequence[str], naming: int) -> list[str]:
    """The source part of trial parameter names: ``[<label>]`` (``[<index>:<label>]`` for a source listed twice),
    ``/s<index>`` in naming version 1."""
    if naming == 1:
        return [f"/s{i}" for i in range(len(sources))]
    labels = model_labels(sources)
    return [f"[{label}]" if labels.count(label) == 1 else f"[{i}:{label}]" for i, label in enumerate(labels)]


def _suggest_one(trial: optuna.Trial, name: str, spec: Searched) -> Scalar:
    if isinstance(spec, ChoiceSpec):
        return trial.suggest_categorical(name, spec.choice)
    assert spec.low is not None and spec.high is not None
    return trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)


def _any_value(spec: Searched, param: Param) -> Scalar:
    """A value for a parameter a baseline does not care about: the registry default if the space holds it."""
    if param.default is not None and spec.contains(param.default):
        return param.default
    return spec.choice[0] if isinstance(spec, ChoiceSpec) else float(spec.low)  # type: ignore[arg-type]


def _resolve_spec(method: MergeMethod, param: Param, spec: ParamSpec) -> ParamSpec:
    """Fill registry defaults into ``spec`` (range bounds, ``layerwise``) and check what is checkable per entry."""
    where = f"{method.name}.{param.name}"
    if isinstance(spec, FixedSpec):
        return spec
    if param.is_bool:
        if isinstance(spec, RangeSpec):
            if spec.model_fields_set:
                raise ValueError(f"{where} is true/false: search it as {{choice: [false, true]}}, not as a range")
            spec = ChoiceSpec(choice=[False, True])
        if spec.layerwise:
            raise ValueError(f"{where} is true/false and cannot vary over layers: drop layerwise")
        return spec.model_copy(update={"layerwise": False})
    update: dict[str, object] = {"layerwise": param.per_source if spec.layerwise is None else spec.layerwise}
    if isinstance(spec, RangeSpec):
        low = param.low if spec.low is None else spec.low
        high = param.high if spec.high is None else spec.high
        if low is None or high is None:
            raise ValueError(f"{where} has no registry range: give low and high")
        if low > high:
            raise ValueError(f"{where}: low {low} > high {high}")
        if spec.log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got {low}")
        update |= {"low": float(low), "high": float(high)}
    elif any(isinstance(c, bool) for c in spec.choice):
        raise ValueError(f"{where} is a number: its choices must be numbers, got {spec.choice}")
    return spec.model_copy(update=update)


def _check_against_registry(method: MergeMethod, plan: Mapping[str, ParamSpec]) -> None:
    """Every value the space can produce (range ends, choices, fixed values) through the registry's validation,
    so out-of-range values, missing required parameters and violated constraints fail at load."""
    n_sources = max(1, method.min_sources)
    probe: dict[str, object] = {}
    for name, spec in plan.items():
        if isinstance(spec, RangeSpec):
            values: list[object] = [spec.low, spec.high]
        elif isinstance(spec, ChoiceSpec):
            values = list(spec.choice)
        else:
            values = list(spec.leaves())
        # Per source: every value for each source (a range's ends are values of one source, not one per source).
        probe[name] = [values] * n_sources if method.param(name).per_source else values
    try:
        validate_params(method, probe, n_sources=n_sources, has_base=True)
    except MethodError as err:
        raise ValueError(
            f"{err} — every range end, choice and fixed value must be valid for the method, and a required "
            "parameter needs an entry"
        ) from None


# --------------------------------------------------------------------------------------- stacking space
_MULTIPLE = re.compile(r"^(\d+(?:\.\d+)?)x$")


class StackingSpace(StrictModel):
    """A searched layer path with per-slot scales (module docstring; Akiba et al. 2024)."""

    method: Literal["passthrough"]
    max_layers: Union[Annotated[int, Field(ge=1)], str] = "1x"
    window: int | None = Field(None, ge=0)
    scale: ParamSpec = FixedSpec(value=1.0)

    @model_validator(mode="after")
    def _check(self) -> StackingSpace:
        if isinstance(self.max_layers, str) and not _MULTIPLE.match(self.max_layers):
            raise ValueError(f"max_layers must be an int or a multiple of the depth like '1.5x': {self.max_layers!r}")
        spec = self.scale
        values: list[object]
        if isinstance(spec, FixedSpec):
            if isinstance(spec.value, (list, dict)):
                raise ValueError("a fixed scale is one number")
            values = [spec.value]
        else:
            if spec.layerwise is not None:
                raise ValueError("scale is per slot already: drop layerwise")
            if isinstance(spec, ChoiceSpec):
                values = list(spec.choice)
            elif spec.low is None or spec.high is None:
                raise ValueError("scale has no registry range: give low and high, e.g. {low: 0.5, high: 1.5}")
            elif spec.low > spec.high or (spec.log and spec.low <= 0):
                raise ValueError(f"scale range [{spec.low}, {spec.high}] is empty (or not > 0 for log)")
            else:
                values = [spec.low, spec.high]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
            raise ValueError(f"scale values must be numbers >= 0, got {values}")
        return self

    def is_continuous(self) -> bool:
        return False

    def slots(self, models: ModelSet) -> int:
        if isinstance(self.max_layers, int):
            return self.max_layers
        factor = float(_MULTIPLE.match(self.max_layers).group(1))  # type: ignore[union-attr]
        return max(1, math.floor(factor * models.num_layers + 0.5))

    def choices(self, slot: int, models: ModelSet) -> list[str]:
        """``skip`` (not for slot 0) and every ``s<i>/l<j>`` within ``window`` of the slot's place."""
        num_slots, depth = self.slots(models), models.num_layers
        centre = math.floor(slot * (depth - 1) / (num_slots - 1) + 0.5) if num_slots > 1 else 0
        layers = [j for j in range(depth) if self.window is None or abs(j - centre) <= self.window]
        return ["skip"] * (slot > 0) + [f"s{i}/l{j}" for i in range(len(models.sources)) for j in layers]

    def suggest(self, trial: optuna.Trial, models: ModelSet, naming: int = NAMING) -> StackRecipe:
        """The path's names (``slot/<k>``, ``scale/<k>``) are the same in every naming version."""
        path: list[tuple[int, int, float]] = []
        for k in range(self.slots(models)):
            pick = trial.suggest_categorical(f"slot/{k}", self.choices(k, models))
            if pick == "skip":
                continue
            spec = self.scale
            scale = spec.value if isinstance(spec, FixedSpec) else _suggest_one(trial, f"scale/{k}", spec)
            source, layer = (int(part[1:]) for part in str(pick).split("/"))
            path.append((source, layer, float(scale)))  # type: ignore[arg-type]
        return StackRecipe(base=models.base, slices=_slices(path, models.sources))

    def baseline_params(self, models: ModelSet, naming: int = NAMING) -> list[tuple[str, dict[str, Any]]]:
        """Each source alone (its layers in order, scale 1), when the embeddings would be that source's too."""
        out = []
        for i, label in enumerate(model_labels(models.sources)):
            try:
                out.append((f"source:{label}", self._source_path(i, models)))
            except _NoFit as why:
                log.debug("baseline source:%s skipped: %s", label, why)
        log.debug("baselines uniform and defaults skipped: passthrough has neither")
        return out

    def _source_path(self, index: int, models: ModelSet) -> dict[str, Any]:
        """Slot ``round(j·(K − 1)/(L − 1))`` takes layer ``j`` of the source (so it is at its own place), the rest
        skip: the path is the source's stack."""
        source, depth, num_slots = models.sources[index], models.num_layers, self.slots(models)
        if models.base not in (None, source):
            raise _NoFit("embeddings and head come from the base, so no path reproduces a source")
        if num_slots < depth:
            raise _NoFit(f"{num_slots} slots cannot hold the {depth} layers of a source")
        at = {math.floor(j * (num_slots - 1) / (depth - 1) + 0.5) if depth > 1 else 0: j for j in range(depth)}
        params: dict[str, Any] = {}
        for k in range(num_slots):
            pick = f"s{index}/l{at[k]}" if k in at else "skip"
            if pick not in self.choices(k, models):
                raise _NoFit(f"slot {k} cannot take {pick} (window {self.window})")
            params[f"slot/{k}"] = pick
            if k not in at:
                continue
            if isinstance(self.scale, FixedSpec):
                if self.scale.value != 1.0:
                    raise _NoFit(f"needs scale 1; the space fixes it at {self.scale.value}")
            elif not self.scale.contains(1.0):
                raise _NoFit(f"needs scale 1, outside the space's {self.scale.describe()}")
            else:
                params[f"scale/{k}"] = 1.0
        return params


def _slices(path: Sequence[tuple[int, int, float]], sources: Sequence[str]) -> list[LayerSlice]:
    """One-layer slices of the path, adjacent ones of one source with consecutive layers and equal scale merged."""
    runs: list[tuple[int, int, int, float]] = []  # (source, start, end, scale)
    for source, layer, scale in path:
        if runs and runs[-1][0] == source and runs[-1][2] == layer and runs[-1][3] == scale:
            runs[-1] = (source, runs[-1][1], layer + 1, scale)
        else:
            runs.append((source, layer, layer + 1, scale))
    return [LayerSlice(model=sources[s], layer_range=(a, b), scale=scale) for s, a, b, scale in runs]


# ------------------------------------------------------------------------------------------------ facade
class SearchSpace:
    """A loaded search space: a :class:`MergeSpace`, a :class:`StackingSpace` (``method: passthrough``) or a
    :class:`~evomerge.search.moe_space.MoeSpace` (``kind: moe``)."""

    def __init__(self, spec: MergeSpace | StackingSpace | MoeSpace, name: str = "<dict>") -> None:
        self.spec = spec
        self.name = name

    @classmethod
    def from_dict(cls, data: object, name: str = "<dict>") -> SearchSpace:
        """Validate a parsed space; SpaceError naming ``name``, each bad entry and the fix."""
        from evomerge.search.moe_space import MoeSpace  # it builds on this module's value specs

        if not isinstance(data, dict):
            raise SpaceError(f"{name}: a search space is a YAML mapping, got {type(data).__name__}")
        model: type[MergeSpace | StackingSpace | MoeSpace]
        if data.get("kind") == "moe":
            model = MoeSpace
        elif "method" not in data:
            raise SpaceError(f"{name}: missing 'method' (a method name, or {{choice: [...]}}; or kind: moe for a "
                             "mixture-of-experts space)")
        else:
            model = StackingSpace if data["method"] == STACK_METHOD else MergeSpace
        if "penalty" in data and model is not MergeSpace:
            kind = "mixture-of-experts" if model is MoeSpace else "layer-stacking"
            raise SpaceError(f"{name}: penalty (an L1 penalty on the searched per-source weights) applies to merge "
                             f"spaces; a {kind} space has no such weights: drop penalty")
        try:
            return cls(model.model_validate(data), name)
        except ValidationError as err:
            problems = one_line(err, "space", lambda where: "unknown key (see the format in evomerge/search/space.py)",
                                _UNION_TAGS)
            raise SpaceError(f"{name}: invalid search space: {problems}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        return cls.from_dict(load_yaml(path), path.name)

    @property
    def methods(self) -> list[str]:
        """The registered merge methods the space's recipes use (none for a layer stack)."""
        return self.spec.methods if isinstance(self.spec, MergeSpace) else []

    def suggest(self, trial: optuna.Trial, models: ModelSet, naming: int = NAMING) -> AnyRecipe:
        """Ask ``trial`` for every searched value (define-by-run, stable names; ``naming``: the study's naming
        version, module docstring) and build the recipe."""
        return self.spec.suggest(trial, models, naming)

    def baseline_params(self, models: ModelSet, naming: int = NAMING) -> list[tuple[str, dict[str, Any]]]:
        """``(label, params for study.enqueue_trial)`` of the baselines the space can express exactly.

        Labels: ``source:<name>`` (each source alone: ``MergeMethod.source_alone_points``), ``uniform`` (the uniform
        average: ``MergeMethod.uniform_points``), ``defaults`` (the registry defaults; ``defaults:<method>`` per method
        of a choice). With a method choice the first method in choice order that expresses a baseline is used.
        A baseline whose values fall outside the space is skipped, with the reason in a debug log.
        """
        return self.spec.baseline_params(models, naming)

    @property
    def penalty(self) -> Penalty | None:
        """The space's L1 penalty on the searched weights (``penalty: {l1: α}``), None without one."""
        return self.spec.penalty if isinstance(self.spec, MergeSpace) else None

    def penalty_of(self, params: Mapping[str, Any], models: ModelSet, naming: int = NAMING) -> float | None:
        """:meth:`MergeSpace.penalty_of` of a trial's parameters; None for spaces without a penalty."""
        return self.spec.penalty_of(params, models, naming) if isinstance(self.spec, MergeSpace) else None

    @property
    def is_moe(self) -> bool:
        """Whether this is a mixture-of-experts space (it searches around the run's MoE template)."""
        return getattr(self.spec, "kind", None) == "moe"

    def check(self, models: ModelSet) -> None:
        """SpaceError, before any model loads, when the space cannot search ``models``: an MoE space needs the run's
        template (``models.template``; a merge or stack space none) and values that fit it
        (:meth:`~evomerge.search.moe_space.MoeSpace.check`). Merge spaces check their methods against the model set
        when a trial asks for them."""
        if self.is_moe:
            self.spec.check(models)  # type: ignore[union-attr]
        elif models.template is not None:
            raise SpaceError(
                f"{self.name}: the run config's template is an MoE template, but this is a "
                f"{'layer-stacking' if isinstance(self.spec, StackingSpace) else 'merge'} space: use an MoE space "
                "(kind: moe, e.g. search_spaces/moe.yaml), or list base and sources instead of template")

    def reference_recipes(self, models: ModelSet) -> list[tuple[str, AnyRecipe]]:
        """The baselines this space cannot express (e.g. the plain average under TIES, whose sign election is no
        average), as linear recipes scored beside the study: ``uniform`` = ``Σ θ_i / N`` and ``source:<label>`` =
        ``θ_i`` (weight 1 on it, 0 on the others, normalised), for every such label missing from
        :meth:`baseline_params`; an MoE space's is mergekit-moe's MoE when the space cannot express it."""
        if self.is_moe:
            return self.spec.reference_recipes(models)  # type: ignore[union-attr,return-value]
        expressed = {label for label, _ in self.baseline_params(models)}
        n = len(models.sources)
        wanted = [(f"source:{label}", [float(i == j) for j in range(n)])
                  for i, label in enumerate(model_labels(models.sources))] + [("uniform", [1.0] * n)]
        return [
            (label, Recipe(method="linear", parameters={"normalize": True},
                           sources=[SourceSpec(model=m, parameters={"weight": w}) for m, w in zip(models.sources, ws)]))
            for label, ws in wanted if label not in expressed
        ]

    def is_continuous(self) -> bool:
        """True when nothing is categorical (no method choice, no ``choice`` entry): CMA-ES applies."""
        return self.spec.is_continuous()
