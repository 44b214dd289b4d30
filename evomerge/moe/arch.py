"""Which upstream MoE class a base maps to, the checks that run before any weight is loaded, and the MoE's config.

| base ``model_type`` | MoE written              | notes                                                 |
| ------------------- | ------------------------ | ----------------------------------------------------- |
| ``llama``           | ``MixtralForCausalLM``   | no attention / MLP biases (Mixtral has none)          |
| ``mistral``         | ``MixtralForCausalLM``   | ``sliding_window`` dropped, as mergekit-moe does      |
| anything else       | refused, one line        | e.g. ``qwen2``: Qwen2-MoE exists upstream, not built  |

Shared experts are refused: Mixtral has none (transformers' ``Qwen2MoeForCausalLM`` has one shared expert with a
sigmoid gate, which mergekit-moe writes for Llama/Mistral/Qwen2 bases; evomerge does not build it yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.checkpoint import Checkpoint, CheckpointError
from evomerge.recipe.schema import PROMPT_MODES, MoeRecipe, RecipeError

__all__ = ["MOE_CLASSES", "MLP_PARTS", "MoeError", "MoeInputs", "mlp_name", "moe_config", "open_moe_inputs"]

#: base model_type -> the transformers class evomerge writes for it
MOE_CLASSES: dict[str, str] = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM"}
#: a dense Llama/Mistral MLP's projections, in the order Mixtral's fused experts hold them (gate, up | down)
MLP_PARTS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# base config keys a Mixtral config takes over as they are
_KEPT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
              "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
              "attention_dropout", "rope_parameters")


class MoeError(RecipeError):
    """An MoE recipe that cannot be built from these models; the message names the model and the fix."""


def mlp_name(layer: int, part: str) -> str:
    """The dense checkpoint's name of ``part`` (gate_proj, up_proj, down_proj) in ``layer``."""
    return f"model.layers.{layer}.mlp.{part}.weight"


@dataclass
class MoeInputs:
    """The opened, checked checkpoints of an MoE recipe: the base and the experts in recipe order."""

    base: Checkpoint
    experts: list[Checkpoint]

    @property
    def num_layers(self) -> int:
        return self.base.num_layers


def _refuse_base(base: Checkpoint) -> None:
    model_type = base.model_type
    if model_type not in MOE_CLASSES:
        raise MoeError(
            f"base {base.path} is a {model_type!r} model; evomerge builds MoEs from llama or mistral bases only "
            f"(-> MixtralForCausalLM){' (Qwen2-MoE is not built yet)' if model_type == 'qwen2' else ''}: choose a "
            "Llama- or Mistral-shaped base")
    config = base.config
    biased = [k for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]
    if biased:
        raise MoeError(f"base {base.path} sets {biased}; Mixtral has no attention or MLP biases, so this base cannot "
                       "become a Mixtral MoE without losing them")


def _refuse_expert(i: int, expert: Checkpoint, base: Checkpoint) -> None:
    where = f"expert {i} ({expert.path})"
    if expert.model_type != base.model_type:
        raise MoeError(f"{where} is a {expert.model_type!r} model, the base ({base.path}) a {base.model_type!r}: "
                       "every expert must be a fine-tune of the base's architecture")
    if expert.num_layers != base.num_layers:
        raise MoeError(f"{where} has {expert.num_layers} layers, the base {base.num_layers}: every expert must have "
                       "the base's shape")
    for layer in range(base.num_layers):
        for part in MLP_PARTS:
            name = mlp_name(layer, part)
            if name not in base:
                raise MoeError(f"base {base.path} has no {name!r}: not a Llama/Mistral MLP layout")
            if name not in expert:
                raise MoeError(f"{where} has no {name!r}: every expert needs the base's MLP tensors")
            if expert.shape(name) != base.shape(name):
                raise MoeError(f"{where}: {name!r} has shape {expert.shape(name)}, the base's {base.shape(name)}: "
                               "every expert must have the base's shape")


def _refuse_recipe(recipe: MoeRecipe, base: Checkpoint) -> None:
    if recipe.shared_experts:
        raise MoeError("shared_experts: MixtralForCausalLM has no shared expert (upstream only Qwen2-MoE has one, "
                       "which evomerge does not build yet); remove shared_experts")
    if recipe.gate_mode in PROMPT_MODES:
        from evomerge.checkpoint import TOKENIZER_FILES

        if not any((base.path / f).is_file() for f in TOKENIZER_FILES):
            raise MoeError(f"gate_mode {recipe.gate_mode!r} tokenizes the prompts with the base's tokenizer, but "
                           f"{base.path} holds none ({', '.join(TOKENIZER_FILES[:2])}, ...): add it, or use "
                           "gate_mode 'random'")


def open_moe_inputs(recipe: MoeRecipe, *, allow_pickle: bool = False) -> MoeInputs:
    """Open the base and the experts and check, from configs and file headers alone, that ``recipe`` can be built:
    a base with an upstream MoE class (:data:`MOE_CLASSES`), experts of its architecture and MLP shapes, a tokenizer
    for prompt gates, no shared experts. Raises :class:`MoeError` (one line)."""
    try:
        base = Checkpoint.open(recipe.base, allow_pickle=allow_pickle)
        experts = [Checkpoint.open(e.model, allow_pickle=allow_pickle) for e in recipe.experts]
    except CheckpointError as exc:
        raise MoeError(str(exc)) from None
    _refuse_base(base)
    _refuse_recipe(recipe, base)
    for i, expert in enumerate(experts):
        _refuse_expert(i, expert, base)
    return MoeInputs(base, experts)


def moe_config(base: Checkpoint, num_experts: int, experts_per_token: int, dtype: Any) -> Any:
    """The ``MixtralConfig`` of the MoE: the base's shape, rotary and token settings, ``num_experts`` experts,
    ``experts_per_token`` of them per token, no sliding window (as mergekit-moe writes it)."""
    from transformers import MixtralConfig

    config = base.config
    kept = {k: getattr(config, k) for k in _KEPT_KEYS if getattr(config, k, None) is not None}
    out = MixtralConfig(**kept, num_local_experts=num_experts, num_experts_per_tok=experts_per_token,
                        sliding_window=None)
    out.architectures = ["MixtralForCausalLM"]
    out.dtype = dtype
    return out

