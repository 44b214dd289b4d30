"""The search space of mixture-of-experts recipes: a declarative YAML file -> Optuna suggestions -> an MoeRecipe.

A space searches around a template :class:`~evomerge.recipe.moe.MoeRecipe` (its base, experts, prompts and gate
mode); every key is optional and keeps the template's value when left out::

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
prompt index). :meth:`MoeSpace.baseline_params` is mergekit-moe's MoE (scale 1, no random rows, no dense layer, the
template's experts_per_token and first prompts) where the space can express it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import Field, ValidationError

from evomerge.recipe import DenseMlp, MoeRecipe
from evomerge.recipe.schema import Scalar, StrictModel, model_labels, one_line
from evomerge.search.space import ChoiceSpec, FixedSpec, ParamSpec, RangeSpec, SpaceError, _Layout, _suggest_one
from evomerge.yamlfile import load_yaml

__all__ = ["MoeSpace"]


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

    @classmethod
    def from_yaml(cls, path: str | Path) -> MoeSpace:
        data = load_yaml(path)
        try:
            return cls.model_validate(data or {})
        except ValidationError as err:
            raise SpaceError(f"{path}: {one_line(err)}") from None

    # ---------------------------------------------------------------------------------------------- checks
    def check(self, template: MoeRecipe, num_layers: int) -> None:
        """SpaceError naming the entry for values the template's models cannot take (before any trial)."""
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
        if self.prompts is not None:
            short = [i for i, e in enumerate(template.experts) if len(e.positive_prompts) < self.prompts]
            if short:
                raise SpaceError(f"moe space: prompts is {self.prompts} but experts {short} have fewer positive "
                                 "prompts in the template")
        if self.layer_groups > num_layers:
            raise SpaceError(f"moe space: layer_groups {self.layer_groups} > the model's {num_layers} layers")

    # --------------------------------------------------------------------------------------------- suggest
    def suggest(self, trial: optuna.Trial, template: MoeRecipe, num_layers: int) -> MoeRecipe:
        """The recipe of ``trial``: the template with every searched key asked of the trial."""
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

    def baseline_params(self, template: MoeRecipe, num_layers: int) -> dict[str, Any] | None:
        """Trial parameters of mergekit-moe's MoE of the template (neutral routers, no dense layer, the first prompt
        window), or None where the space cannot express it (a range or choice without the neutral value)."""
        groups = min(self.layer_groups, num_layers)
        neutral: list[tuple[str, ParamSpec | None, Scalar]] = [
            ("experts_per_token", self.experts_per_token, template.experts_per_token),
            ("random_weight", self.random_weight, 0.0),
            *((f"router_scale{_layers(g, groups, num_layers)}", self.router_scale, 1.0) for g in range(groups)),
            *((f"dense{_layers(g, groups, num_layers)}", self.dense, False) for g in range(groups)),
        ]
        params: dict[str, Any] = {}
        for name, spec, value in neutral:
            if spec is None or isinstance(spec, FixedSpec):
                continue
            if not spec.contains(value):
                return None
            params[name] = value
        if self.prompts is not None:
            params.update({f"prompts[{lb}]": 0 for lb in _labels(template)})
        return params


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
