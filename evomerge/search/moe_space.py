"""The search space of mixture-of-experts recipes: a declarative YAML file -> Optuna suggestions -> an MoeRecipe.

A space searches around a template :class:`~evomerge.recipe.MoeRecipe` (its base, experts, prompts and gate mode:
the run config's ``template``, carried by the :class:`~evomerge.search.space.ModelSet`); it is the third kind of
space behind :class:`~evomerge.search.space.SearchSpace` (``kind: moe``), so ``evomerge search`` runs it like any
other. Every key is optional and keeps the template's value when left out::

    kind: moe
    layer_groups: 2                     # G groups of consecutive layers (layer l of L in group floor(l·G/L))
    experts_per_token: {choice: [1, 2, 3]}
    router_scale: {low: 0.25, high: 4.0, log: true}   # per layer group: the router's inverse temperature
    random_weight: {low: 0.0, high: 0.5}              # weight of seeded random rows vs the prompt gate
    dense: {choice: [false, true]}      # per layer group: keep a dense MLP merged from the experts' MLPs
    dense_method: linear                # any evomerge method (no data statistics) for those layers ...
    dense_parameters: {}                #   ... its global parameters (fixed)
    dense_weight: {low: 0.0, high: 1.0} # per expert: its weight in the dense merge (absent: the method's default)
    prompts: 4                          # per expert: a window of 4 of the template's positive prompts

Entries are those of :mod:`evomerge.search.space`: ``{low, high, log, step}`` ranges, ``{choice: [...]}`` or a fixed
value. Trial parameters are named for what they are: ``experts_per_token``, ``router_scale[layers 0-1]``,
``random_weight``, ``dense[layers 2-3]``, ``dense_weight[expert_sort]``, ``prompts[expert_sort]`` (the window's first
prompt index). The study's baseline (``baseline:mergekit-moe``) is mergekit-moe's MoE of the template: router scale 1,
no random rows, no dense layer, the template's experts_per_token and each expert's first prompt window; where the
space cannot express it (:meth:`MoeSpace.baseline_params` is empty) it is scored beside the study as the reference
``mergekit-moe`` (:meth:`MoeSpace.reference_recipes`).
"""

from __future__ import annotations

from typing import Any, Literal

import optuna
from pydantic import Field

from evomerge.recipe import DenseMlp, MoeRecipe
from evomerge.recipe.schema import PROMPT_MODES, Scalar, StrictModel, model_labels
from evomerge.search.space import (
    NAMING,
    ChoiceSpec,
    FixedSpec,
    ModelSet,
    ParamSpec,
    RangeSpec,
    SpaceError,
    _Layout,
    _suggest_one,
)

__all__ = ["BASELINE", "NO_TEMPLATE", "MoeSpace"]

#: the label of mergekit-moe's MoE of the template, the study's baseline (or reference)
BASELINE = "mergekit-moe"
NO_TEMPLATE = ("an MoE space (kind: moe) searches around an MoE template: set 'template' in the run config (an MoE "
               "recipe file, kind: moe, or a mergekit-moe config) instead of base and sources")


class MoeSpace(StrictModel):
    """Which MoE recipes a study may propose around a template (module docstring)."""

    kind: Literal["moe"] = "moe"
    layer_groups: int = Field(1, ge=1)
    experts_per_token: ParamSpec | None = None
    router_scale: ParamSpec | None = None
    random_weight: ParamSpec | None = None
    dense: ParamSpec | None = None
    dense_method: str = "linear"
    dense_parameters: dict[str, Any] = Field(default_factory=dict)
    dense_weight: ParamSpec | None = None
    prompts: int | None = Field(None, ge=1)

    # ---------------------------------------------------------------------------------------------- checks
    def check(self, models: ModelSet) -> None:
        """SpaceError naming the entry for values the template's models cannot take (before any model loads:
        ``models.num_layers`` comes from the base's config)."""
        template, num_layers = _template(models), models.num_layers
        n = len(template.experts)
        for name, low, high in (("experts_per_token", 1, n), ("random_weight", 0.0, 1.0),
                                ("router_scale", 1e-6, float("inf")), ("dense_weight", 0.0, float("inf"))):
            spec = getattr(self, name)
            if isinstance(spec, RangeSpec) and (spec.low is None or spec.high is None):
                raise SpaceError(f"moe space: {name} needs low and high (an MoE key has no registry range)")
            values = [] if spec is None else _ends(spec)
            bad = [v for v in values if isinstance(v, bool) or not low <= v <= high]
            if bad:
                raise SpaceError(f"moe space: {name} takes values in [{low:g}, {high:g}] here ({n} experts), got "
                                 f"[{', '.join(f'{v:g}' for v in bad)}]")
            if name == "experts_per_token" and any(int(v) != v for v in values):
                raise SpaceError(f"moe space: experts_per_token is a whole number, got {values}")
        if isinstance(self.experts_per_token, RangeSpec):
            raise SpaceError("moe space: experts_per_token is a {choice: [...]} of whole numbers, not a range")
        if self.prompts is not None and template.gate_mode not in PROMPT_MODES:
            raise SpaceError(f"moe space: prompts chooses windows of the experts' prompts, but the template's "
                             f"gate_mode {template.gate_mode!r} uses no prompts: remove prompts or use a "
                             f"prompt gate mode ({', '.join(sorted(PROMPT_MODES))})")
        if self.prompts is not None:
            short = [i for i, e in enumerate(template.experts) if len(e.positive_prompts) < self.prompts]
            if short:
                raise SpaceError(f"moe space: prompts is {self.prompts} but experts {short} have fewer positive "
                                 "prompts in the template")
        if self.layer_groups > num_layers:
            raise SpaceError(f"moe space: layer_groups {self.layer_groups} > the model's {num_layers} layers")

    def is_continuous(self) -> bool:
        """True when every searched key is a float range (no choice, no prompt windows): CMA-ES applies."""
        specs = [self.experts_per_token, self.router_scale, self.random_weight, self.dense, self.dense_weight]
        return self.prompts is None and not any(isinstance(s, ChoiceSpec) for s in specs)

    # --------------------------------------------------------------------------------------------- suggest
    def suggest(self, trial: optuna.Trial, models: ModelSet, naming: int = NAMING) -> MoeRecipe:
        """The recipe of ``trial``: the template with every searched key asked of the trial (the names are the same
        in every naming version)."""
        template, num_layers = _template(models), models.num_layers
        groups = min(self.layer_groups, num_layers)
        labels = _labels(template)
        fields: dict[str, Any] = {}
        if self.experts_per_token is not None:
            fields["experts_per_token"] = int(_ask(trial, "experts_per_token", self.experts_per_token))
        if self.random_weight is not None:
            fields["random_weight"] = float(_ask(trial, "random_weight", self.random_weight))
        if self.router_scale is not None:
            scales = [float(_ask(trial, f"router_scale{_layers(g, groups, num_layers)}", self.router_scale))
                      for g in range(groups)]
            # equal group values are one scalar: the same routers, and the template's form at the baseline
            fields["router_scale"] = scales[0] if len(set(scales)) == 1 else [scales[i * groups // num_layers]
                                                                            for i in range(num_layers)]
        if self.dense is not None:
            dense = [bool(_ask(trial, f"dense{_layers(g, groups, num_layers)}", self.dense)) for g in range(groups)]
            layers = [i for i in range(num_layers) if dense[i * groups // num_layers]]
            if layers:  # the dense merge's weights are asked only when a layer is dense (a conditional space)
                weights = None if self.dense_weight is None else \
                    [float(_ask(trial, f"dense_weight[{lb}]", self.dense_weight)) for lb in labels]
                fields["dense_layers"] = DenseMlp(layers=layers, method=self.dense_method,
                                                  parameters=self.dense_parameters, weights=weights)
        if self.prompts is not None:
            k = self.prompts
            experts = []
            for expert, label in zip(template.experts, labels):
                starts = list(range(0, len(expert.positive_prompts) - k + 1, k))
                start = trial.suggest_categorical(f"prompts[{label}]", starts)
                experts.append(expert.model_copy(update={"positive_prompts": expert.positive_prompts[start:start + k]}))
            fields["experts"] = experts
        return template.model_copy(update=fields)

    def baseline_params(self, models: ModelSet, naming: int = NAMING) -> list[tuple[str, dict[str, Any]]]:
        """``[("mergekit-moe", trial params)]``: mergekit-moe's MoE of the template (neutral routers, no dense layer,
        the first prompt window); ``[]`` where the space cannot express it (a range or choice without the neutral
        value, or a fixed value other than it)."""
        template, num_layers = _template(models), models.num_layers
        groups = min(self.layer_groups, num_layers)
        neutral: list[tuple[str, ParamSpec | None, Scalar]] = [
            ("experts_per_token", self.experts_per_token, template.experts_per_token),
            ("random_weight", self.random_weight, 0.0),
            *((f"router_scale{_layers(g, groups, num_layers)}", self.router_scale, 1.0) for g in range(groups)),
            *((f"dense{_layers(g, groups, num_layers)}", self.dense, False) for g in range(groups)),
        ]
        params: dict[str, Any] = {}
        for name, spec, value in neutral:
            if spec is None:
                continue
            if isinstance(spec, FixedSpec):  # every trial has this value: mergekit-moe's MoE only if it is neutral
                if spec.value != value:
                    return []
                continue
            if not spec.contains(value):
                return []
            params[name] = value
        if self.prompts is not None:
            params.update({f"prompts[{lb}]": 0 for lb in _labels(template)})
        return [(BASELINE, params)]

    def reference_recipes(self, models: ModelSet) -> list[tuple[str, MoeRecipe]]:
        """``[("mergekit-moe", recipe)]`` when the space cannot express that baseline (it is scored beside the
        study), else ``[]``."""
        if self.baseline_params(models):
            return []
        template = _template(models)
        experts = template.experts if self.prompts is None else \
            [e.model_copy(update={"positive_prompts": e.positive_prompts[:self.prompts]}) for e in template.experts]
        return [(BASELINE, template.model_copy(update={"router_scale": 1.0, "random_weight": 0.0,
                                                      "dense_layers": None, "experts": experts}))]


def _template(models: ModelSet) -> MoeRecipe:
    if models.template is None:
        raise SpaceError(NO_TEMPLATE)
    return models.template


def _ends(spec: ParamSpec) -> list[Any]:
    if isinstance(spec, RangeSpec):
        return [v for v in (spec.low, spec.high) if v is not None]
    if isinstance(spec, ChoiceSpec):
        return list(spec.choice)
    return list(spec.leaves())


def _ask(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    return spec.value if isinstance(spec, FixedSpec) else _suggest_one(trial, name, spec)


def _layers(group: int, groups: int, num_layers: int) -> str:
    """``[layers a-b]`` / ``[layer a]`` of a group, ``""`` with one group (the names of evomerge.search.space)."""
    return _Layout(groups, (), num_layers, gradient=False).layers(group)


def _labels(template: MoeRecipe) -> list[str]:
    """The experts' labels in trial names (``<index>:<label>`` where an expert is listed twice)."""
    labels = model_labels([e.model for e in template.experts])
    return labels if len(set(labels)) == len(labels) else [f"{i}:{lb}" for i, lb in enumerate(labels)]
