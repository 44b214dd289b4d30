"""The mixture-of-experts recipe: dense fine-tunes of one base assembled into a sparse MoE (plain data, no torch).

An :class:`MoeRecipe` says how to build a Mixtral-style model from a base and its fine-tunes: attention, norms,
embeddings and head from ``base``; in every layer, each expert's MLP becomes one expert; a router per layer sends
each token to ``experts_per_token`` of them. The router rows are initialised by ``gate_mode``, with mergekit-moe's
meaning (``mergekit/moe/router.py``):

- ``hidden`` (mergekit's default, also ``hidden_last``): per layer, the base model's hidden state entering that
  layer at the *last* token of each positive prompt, averaged over the prompts, minus the same for the negative
  prompts, normalised to unit length; computed in bfloat16, as mergekit does;
- ``hidden_avg``: the same with the hidden states averaged over each prompt's tokens;
- ``cheap_embed``: the sum of the prompts' token embeddings (no forward pass), normalised, the same for every layer;
- ``random``: standard normal rows, ``uniform_random``: ``U(−1/√h, 1/√h)`` (torch.nn.Linear's init); both drawn
  from ``seed`` (mergekit-moe ``--random-seed SEED`` draws the same ones).

What the search adds beyond mergekit-moe (all neutral by default, so a mergekit-moe config means what it means there):
``router_scale`` (a scalar or a gradient across the layers, as any evomerge parameter: multiplies the router rows,
i.e. a softmax temperature of ``1/scale``), ``random_weight`` (router rows ``(1 − r)·g + r·z/|z|`` with ``z`` the
seeded normal rows: the weight of the prompt gate vs random) and ``dense_layers`` (layers whose experts all hold
one dense MLP merged from the experts' MLPs by any evomerge method, :class:`DenseMlp`).

:func:`from_mergekit_moe` / :func:`to_mergekit_moe` convert mergekit-moe's YAML (``base_model``, ``experts``,
``gate_mode``, ...) with the same meaning; the build is :mod:`evomerge.moe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from evomerge.recipe.schema import ParamValue, RecipeError, StrictModel, Value, one_line, refuse_unknown_keys

__all__ = ["DenseMlp", "GATE_MODES", "MoeExpert", "MoeRecipe", "from_mergekit_moe", "is_mergekit_moe",
           "load_moe_recipe", "to_mergekit_moe", "to_mergekit_moe_yaml"]

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
GATE_MODES: tuple[str, ...] = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = {"hidden", "hidden_last", "hidden_avg", "cheap_embed"}


class MoeExpert(StrictModel):
    """One expert: a fine-tune of the base whose MLPs become expert ``i`` of every layer, with the prompts that
    should be routed to it (``positive_prompts``) and away from it (``negative_prompts``); ``residual_scale``
    multiplies its ``down_proj`` (mergekit-moe's key of the same name)."""

    model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: float = 1.0


class DenseMlp(StrictModel):
    """Layers that keep a dense MLP: every expert slot of each layer in ``layers`` holds the experts' MLPs merged by
    ``method`` (any evomerge method, with ``parameters`` as in a merge recipe and per-expert ``weights`` in
    expert order), so whichever experts the router picks, the layer computes that one MLP (the top-k weights sum
    to 1). ``base`` of the merge is the MoE's base."""

    layers: list[int]
    method: str = "linear"
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    weights: list[float] | None = None

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError(f"dense_layers.layers must be distinct layer indices >= 0, got {v}")
        return sorted(v)


class MoeRecipe(StrictModel):
    """How to build one mixture of experts from dense experts (see the module docstring for every key)."""

    kind: Literal["moe"] = "moe"
    base: str
    experts: list[MoeExpert]
    experts_per_token: int = Field(2, ge=1)
    gate_mode: GateMode = "hidden"
    shared_experts: list[MoeExpert] = Field(default_factory=list)
    router_scale: Value = 1.0
    random_weight: float = Field(0.0, ge=0.0, le=1.0)
    dense_layers: DenseMlp | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> MoeRecipe:
        n = len(self.experts)
        if n < 1:
            raise ValueError("an MoE recipe needs at least one entry in 'experts'")
        if self.experts_per_token > n:
            raise ValueError(f"experts_per_token is {self.experts_per_token} but there are only {n} experts: "
                             f"set experts_per_token to at most {n} or add experts")
        if self.gate_mode in PROMPT_MODES:
            empty = [i for i, e in enumerate(self.experts) if not e.positive_prompts]
            if empty:
                raise ValueError(f"gate_mode {self.gate_mode!r} computes each router row from the expert's prompts, "
                                 f"but experts {empty} have an empty positive_prompts list: give every expert at least "
                                 "one positive prompt, or use gate_mode 'random'")
        if self.dense_layers is not None and self.dense_layers.weights is not None \
                and len(self.dense_layers.weights) != n:
            raise ValueError(f"dense_layers.weights has {len(self.dense_layers.weights)} entries for {n} experts")
        return self

    def model_paths(self) -> list[str]:
        """Every distinct model path the recipe reads, base first."""
        return list(dict.fromkeys([self.base, *(e.model for e in self.experts),
                                   *(e.model for e in self.shared_experts)]))

    def to_yaml(self) -> str:
        return yaml.safe_dump({"kind": "moe"} | self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


# ------------------------------------------------------------------------------------------------- mergekit-moe
MERGEKIT_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
MERGEKIT_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


def is_mergekit_moe(data: Mapping[str, Any]) -> bool:
    """Whether a parsed YAML mapping is a mergekit-moe config (``base_model`` and ``experts``, no ``merge_method``)."""
    return "experts" in data and "base_model" in data and "merge_method" not in data


def _expert_from_mergekit(entry: Any, where: str) -> MoeExpert:
    if not isinstance(entry, Mapping) or "source_model" not in entry:
        raise RecipeError(f"mergekit-moe {where}: an expert is a mapping with 'source_model'")
    unknown = sorted(set(entry) - MERGEKIT_EXPERT_KEYS)
    if unknown:
        raise RecipeError(f"mergekit-moe {where}: unsupported key(s) {unknown}; evomerge understands "
                          f"{sorted(MERGEKIT_EXPERT_KEYS)}")
    if entry.get("noise_scale") is not None:
        raise RecipeError(f"mergekit-moe {where}: noise_scale adds unseeded torch.randn noise to the expert in "
                          "mergekit (not reproducible); evomerge does not implement it: remove the key")
    scale = entry.get("residual_scale")
    return MoeExpert(model=str(entry["source_model"]), positive_prompts=list(entry.get("positive_prompts") or []),
                     negative_prompts=list(entry.get("negative_prompts") or []),
                     residual_scale=1.0 if scale is None else float(scale))


def from_mergekit_moe(data: Mapping[str, Any]) -> MoeRecipe:
    """A mergekit-moe config (the file ``mergekit-moe`` reads) as an :class:`MoeRecipe`; unsupported keys are named.
    ``architecture`` may only name Mixtral (the one output class evomerge writes, see :mod:`evomerge.moe.arch`)."""
    unknown = sorted(set(data) - MERGEKIT_KEYS)
    if unknown:
        raise RecipeError(f"mergekit-moe config: unsupported key(s) {unknown}; evomerge understands "
                          f"{sorted(MERGEKIT_KEYS)}")
    arch = data.get("architecture")
    if arch is not None and not "mixtral".startswith(str(arch).lower()):
        raise RecipeError(f"mergekit-moe architecture {arch!r}: evomerge writes Mixtral MoEs only (Llama/Mistral "
                          "bases); remove 'architecture' or set it to 'mixtral'")
    experts = [_expert_from_mergekit(e, f"experts[{i}]") for i, e in enumerate(data.get("experts") or [])]
    shared = [_expert_from_mergekit(e, f"shared_experts[{i}]") for i, e in enumerate(data.get("shared_experts") or [])]
    fields: dict[str, Any] = {"base": str(data["base_model"]), "experts": experts, "shared_experts": shared}
    for key in ("gate_mode", "dtype", "experts_per_token"):
        if data.get(key) is not None:
            fields[key] = data[key]
    return _validated(fields, "mergekit-moe config")


def _neutral(recipe: MoeRecipe) -> list[str]:
    """The keys of ``recipe`` that mergekit-moe has no equivalent for and that are not at their neutral value."""
    return [key for key, neutral in (("router_scale", 1.0), ("random_weight", 0.0), ("dense_layers", None))
            if getattr(recipe, key) != neutral]


def _expert_to_mergekit(expert: MoeExpert) -> dict[str, Any]:
    out: dict[str, Any] = {"source_model": expert.model}
    if expert.positive_prompts:
        out["positive_prompts"] = list(expert.positive_prompts)
    if expert.negative_prompts:
        out["negative_prompts"] = list(expert.negative_prompts)
    if expert.residual_scale != 1.0:
        out["residual_scale"] = expert.residual_scale
    return out


def to_mergekit_moe(recipe: MoeRecipe) -> dict[str, Any]:
    """The mergekit-moe config of ``recipe``. Keys mergekit-moe has no equivalent for (``router_scale``,
    ``random_weight``, ``dense_layers``) must be at their neutral value: RecipeError naming them otherwise."""
    extra = _neutral(recipe)
    if extra:
        raise RecipeError(f"the MoE recipe sets {extra}, which mergekit-moe has no key for; only recipes without them "
                          "export to mergekit-moe")
    out: dict[str, Any] = {"base_model": recipe.base, "gate_mode": recipe.gate_mode,
                           "experts_per_token": recipe.experts_per_token,
                           "experts": [_expert_to_mergekit(e) for e in recipe.experts]}
    if recipe.shared_experts:
        out["shared_experts"] = [_expert_to_mergekit(e) for e in recipe.shared_experts]
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    return out


def to_mergekit_moe_yaml(recipe: MoeRecipe) -> str:
    """:func:`to_mergekit_moe` as YAML text; random gates carry a comment on how mergekit-moe draws the same ones."""
    text = yaml.safe_dump(to_mergekit_moe(recipe), sort_keys=False)
    if recipe.gate_mode in ("random", "uniform_random"):
        text = (f"# evomerge draws the random router rows from seed {recipe.seed}; run mergekit-moe with "
                f"--random-seed {recipe.seed} for the same rows\n") + text
    return text


def load_moe_recipe(data: Mapping[str, Any], where: str) -> MoeRecipe:
    """An :class:`MoeRecipe` from a parsed evomerge MoE recipe (``kind: moe``) or mergekit-moe config, with the
    closest valid key named for a misspelt one."""
    if is_mergekit_moe(data):
        return from_mergekit_moe(data)
    refuse_unknown_keys(data, MoeRecipe.model_fields, where)
    for i, expert in enumerate(data.get("experts") or []):
        if isinstance(expert, Mapping):
            refuse_unknown_keys(expert, MoeExpert.model_fields, f"{where}: experts[{i}]")
    return _validated(data, where)


def _validated(data: Mapping[str, Any], where: str) -> MoeRecipe:
    """``MoeRecipe.model_validate(data)``, pydantic's errors as one RecipeError line (``key: problem; ...``)."""
    try:
        return MoeRecipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{where}: {one_line(err)}") from None
