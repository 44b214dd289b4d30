"""mergekit-moe YAML <-> the mixture-of-experts recipe (:class:`~evomerge.recipe.schema.MoeRecipe`, plain data).

mergekit-moe reads its own file format (``base_model``, ``experts[].source_model``, ``gate_mode``, ...), not a
mergekit config: :func:`from_mergekit_moe` / :func:`to_mergekit_moe` convert it with the same meaning (the recipe's
keys are documented on :class:`~evomerge.recipe.schema.MoeRecipe`); :func:`evomerge.recipe.load_recipe` and
:func:`evomerge.recipe.mergekit.to_mergekit_yaml` dispatch to them. The build is :mod:`evomerge.moe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.recipe.schema import MoeExpert, MoeRecipe, RecipeError, one_line

__all__ = ["MERGEKIT_MOE_CONFIG", "from_mergekit_moe", "is_mergekit_moe", "mergekit_moe_exportable", "to_mergekit_moe",
           "to_mergekit_moe_yaml"]

#: the file name mergekit-moe gives the config it writes beside an MoE (mergekit/scripts/moe.py)
MERGEKIT_MOE_CONFIG = "mergekit_moe_config.yml"

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


#: the names of mergekit-moe's output classes that evomerge writes (``architecture`` picks the ones it is a
#: prefix of, case-insensitively: mergekit/scripts/moe.py) -> the recipe's architecture
MERGEKIT_ARCHITECTURES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe"}
#: the recipe's architecture -> the ``architecture`` value an exported config names it by
EXPORTED_ARCHITECTURES = {"mixtral": "mixtral", "qwen2_moe": "qwen"}


def _architecture(data: Mapping[str, Any], shared: list[MoeExpert]) -> str | None:
    """The recipe's ``architecture`` for a mergekit-moe config: the class mergekit-moe builds for it, or RecipeError
    where that is one evomerge does not write (DeepSeek-MoE, Qwen3-MoE)."""
    arch = data.get("architecture")
    if arch is None:
        # mergekit-moe takes the first class that accepts the config: Mixtral (no shared expert), then DeepSeek-MoE,
        # which takes a Llama/Mistral base's shared expert without prompts
        if shared and not (shared[0].positive_prompts or shared[0].negative_prompts):
            raise RecipeError("mergekit-moe config: with a shared expert without prompts and no 'architecture', "
                              "mergekit-moe builds a DeepSeek MoE, which evomerge does not write: set "
                              "'architecture: qwen' (Qwen2-MoE, random gates) or give the shared expert prompts")
        return None
    matches = [ours for name, ours in MERGEKIT_ARCHITECTURES.items() if name.startswith(str(arch).lower())]
    if len(matches) != 1:
        raise RecipeError(f"mergekit-moe architecture {arch!r}: evomerge writes 'mixtral' (MixtralForCausalLM) and "
                          "'qwen' (Qwen2MoeForCausalLM, one shared expert) MoEs: set one of them or remove the key")
    return matches[0]


def from_mergekit_moe(data: Mapping[str, Any]) -> MoeRecipe:
    """A mergekit-moe config (the file ``mergekit-moe`` reads) as an :class:`MoeRecipe`; unsupported keys are named.
    ``architecture`` may name Mixtral or Qwen (Qwen2-MoE), the output classes evomerge writes (see
    :mod:`evomerge.moe.arch`)."""
    unknown = sorted(set(data) - MERGEKIT_KEYS)
    if unknown:
        raise RecipeError(f"mergekit-moe config: unsupported key(s) {unknown}; evomerge understands "
                          f"{sorted(MERGEKIT_KEYS)}")
    experts = [_expert_from_mergekit(e, f"experts[{i}]") for i, e in enumerate(data.get("experts") or [])]
    shared = [_expert_from_mergekit(e, f"shared_experts[{i}]") for i, e in enumerate(data.get("shared_experts") or [])]
    fields: dict[str, Any] = {"base": str(data["base_model"]), "experts": experts, "shared_experts": shared,
                              "architecture": _architecture(data, shared)}
    for key in ("gate_mode", "dtype", "experts_per_token"):
        if data.get(key) is not None:
            fields[key] = data[key]
    return _validated(fields, "mergekit-moe config")


def _neutral(recipe: MoeRecipe) -> list[str]:
    """The keys of ``recipe`` that mergekit-moe has no equivalent for and that are not at their neutral value, and a
    shared expert mergekit-moe cannot read (it opens only the base and the experts: ``mergekit/moe/common.py``)."""
    keys = [key for key, neutral in (("router_scale", 1.0), ("random_weight", 0.0), ("dense_layers", None))
            if getattr(recipe, key) != neutral]
    opened = {recipe.base, *(e.model for e in recipe.experts)}
    return keys + [f"shared_experts[{i}] (a model other than the base and the experts)"
                   for i, e in enumerate(recipe.shared_experts) if e.model not in opened]


def mergekit_moe_exportable(recipe: MoeRecipe) -> bool:
    """Whether mergekit-moe can build ``recipe``: every key it has no equivalent for at its neutral value, a shared
    expert (if any) one of the models it opens."""
    return not _neutral(recipe)


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
        raise RecipeError(f"the MoE recipe sets {extra}, which mergekit-moe has no key for (or cannot read); only "
                          "recipes without them export to mergekit-moe")
    out: dict[str, Any] = {"base_model": recipe.base, "gate_mode": recipe.gate_mode,
                           "experts_per_token": recipe.experts_per_token,
                           "experts": [_expert_to_mergekit(e) for e in recipe.experts]}
    if recipe.shared_experts:
        out["shared_experts"] = [_expert_to_mergekit(e) for e in recipe.shared_experts]
    if recipe.architecture is not None or recipe.output_architecture != "mixtral":
        # named whenever it is not Mixtral: without it mergekit-moe may pick DeepSeek-MoE for a shared expert
        out["architecture"] = EXPORTED_ARCHITECTURES[recipe.output_architecture]
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


def _validated(data: Mapping[str, Any], where: str) -> MoeRecipe:
    """``MoeRecipe.model_validate(data)``, pydantic's errors as one RecipeError line (``key: problem; ...``)."""
    try:
        return MoeRecipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{where}: {one_line(err)}") from None
