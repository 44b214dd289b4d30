"""Which upstream MoE class a recipe is written as, the checks that run before any weight is loaded, the MoE's config.

The recipe's ``architecture`` (:attr:`~evomerge.recipe.MoeRecipe.output_architecture`: ``qwen2_moe`` with a shared
expert, ``mixtral`` without, unless set) picks the class; each takes the bases mergekit-moe 0.1.5 builds it from
(``mergekit/moe/mixtral.py``, ``qwen.py``):

| ``architecture`` | class written           | base ``model_type``   | notes                                         |
| ---------------- | ----------------------- | --------------------- | --------------------------------------------- |
| ``mixtral``      | ``MixtralForCausalLM``  | llama, mistral        | no shared expert; no attention or MLP biases  |
| ``qwen2_moe``    | ``Qwen2MoeForCausalLM`` | llama, mistral, qwen2 | one sigmoid-gated shared expert; q/k/v biases |
|                  |                         |                       | the base's, zeros where it has none           |
| anything else    | refused, one line       |                       | e.g. gemma, BERT                              |

Both drop Mistral's ``sliding_window``, as mergekit-moe does. transformers (5.x) holds both classes' routed experts
as fused 3-D parameters (``mlp.experts.gate_up_proj`` (experts, 2·intermediate, hidden), ``mlp.experts.down_proj``);
Qwen2-MoE's shared expert is a plain MLP (``mlp.shared_expert.{gate,up,down}_proj``) with a one-row gate
(``mlp.shared_expert_gate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.checkpoint import Checkpoint, CheckpointError
from evomerge.recipe.io import relative_path_hint
from evomerge.recipe.schema import PROMPT_MODES, MoeRecipe, RecipeError

__all__ = ["MOE_CLASSES", "MLP_PARTS", "MoeClass", "MoeError", "MoeInputs", "mlp_name", "moe_config",
           "open_moe_inputs"]


@dataclass(frozen=True)
class MoeClass:
    """An upstream MoE class evomerge writes: its transformers class and the base model types it is built from."""

    name: str
    bases: tuple[str, ...]


#: the recipe's architecture -> the class evomerge writes for it
MOE_CLASSES: dict[str, MoeClass] = {"mixtral": MoeClass("MixtralForCausalLM", ("llama", "mistral")),
                                    "qwen2_moe": MoeClass("Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"))}
#: a dense Llama/Mistral/Qwen2 MLP's projections, in the order the fused experts hold them (gate, up | down)
MLP_PARTS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# base config keys the MoE config takes over as they are
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
    """The opened, checked checkpoints of an MoE recipe: the base, the experts and the shared experts in recipe
    order, and the class the MoE is written as."""

    base: Checkpoint
    experts: list[Checkpoint]
    shared: list[Checkpoint]
    architecture: str

    @property
    def num_layers(self) -> int:
        return self.base.num_layers


def _refuse_base(base: Checkpoint, architecture: str) -> None:
    model_type, moe = base.model_type, MOE_CLASSES[architecture]
    if model_type not in moe.bases:
        other = [a for a, c in MOE_CLASSES.items() if model_type in c.bases]
        fix = (f"write it as {MOE_CLASSES[other[0]].name} (architecture: {other[0]}, one shared expert)" if other else
               "choose a Llama-, Mistral- or Qwen2-shaped base")
        raise MoeError(f"base {base.path} is a {model_type!r} model; {moe.name} is built from "
                       f"{' / '.join(moe.bases)} bases: {fix}")
    config = base.config
    biased = [k for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]
    if biased:
        has = ("no MLP or o_proj biases (a Llama's attention_bias biases o_proj too)" if architecture == "qwen2_moe"
               else "no attention or MLP biases")
        raise MoeError(f"base {base.path} sets {biased}; {moe.name} has {has}, so this base cannot become one "
                       "without losing them")


def _refuse_expert(where: str, expert: Checkpoint, base: Checkpoint) -> None:
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
                raise MoeError(f"base {base.path} has no {name!r}: not a Llama/Mistral/Qwen2 MLP layout")
            if name not in expert:
                raise MoeError(f"{where} has no {name!r}: every expert needs the base's MLP tensors")
            if expert.shape(name) != base.shape(name):
                raise MoeError(f"{where}: {name!r} has shape {expert.shape(name)}, the base's {base.shape(name)}: "
                               "every expert must have the base's shape")


def _refuse_recipe(recipe: MoeRecipe, base: Checkpoint) -> None:
    if recipe.gate_mode in PROMPT_MODES:
        from evomerge.checkpoint import TOKENIZER_FILES

        if not any((base.path / f).is_file() for f in TOKENIZER_FILES):
            raise MoeError(f"gate_mode {recipe.gate_mode!r} tokenizes the prompts with the base's tokenizer, but "
                           f"{base.path} holds none ({', '.join(TOKENIZER_FILES[:2])}, ...): add it, or use "
                           "gate_mode 'random'")


def _open(path: str, allow_pickle: bool) -> Checkpoint:
    """The checkpoint at ``path``; MoeError naming it, and for a relative path the dir it was taken from."""
    try:
        return Checkpoint.open(path, allow_pickle=allow_pickle)
    except CheckpointError as exc:
        raise MoeError(f"{exc}{relative_path_hint(path)}") from None


def open_moe_inputs(recipe: MoeRecipe, *, allow_pickle: bool = False) -> MoeInputs:
    """Open the base and the experts and check, from configs and file headers alone, that ``recipe`` can be built: a
    base its output class is built from (:data:`MOE_CLASSES`), experts and shared experts of its architecture and
    MLP shapes, a tokenizer for prompt gates (the shared experts the class holds are the recipe's own check).
    Raises :class:`MoeError` (one line)."""
    base = _open(recipe.base, allow_pickle)
    experts = [_open(e.model, allow_pickle) for e in recipe.experts]
    shared = [_open(e.model, allow_pickle) for e in recipe.shared_experts]
    architecture = recipe.output_architecture
    _refuse_base(base, architecture)
    _refuse_recipe(recipe, base)
    for where, checkpoint in [*((f"expert {i} ({c.path})", c) for i, c in enumerate(experts)),
                              *((f"shared expert {i} ({c.path})", c) for i, c in enumerate(shared))]:
        _refuse_expert(where, checkpoint, base)
    return MoeInputs(base, experts, shared, architecture)


def moe_config(inputs: MoeInputs, experts_per_token: int, dtype: Any) -> Any:
    """The config of the MoE (mergekit-moe's, ``mergekit/moe/{mixtral,qwen}.py``): the base's shape, rotary and token
    settings, one routed expert per recipe expert, ``experts_per_token`` of them per token, no sliding window; for
    Qwen2-MoE also top-k weights renormalised (``norm_topk_prob``), every layer sparse, routed and shared experts of
    the base's intermediate size, q/k/v biases."""
    import transformers

    config = inputs.base.config
    kept = {k: getattr(config, k) for k in _KEPT_KEYS if getattr(config, k, None) is not None}
    num_experts = len(inputs.experts)
    if inputs.architecture == "mixtral":
        out = transformers.MixtralConfig(**kept, num_local_experts=num_experts, num_experts_per_tok=experts_per_token,
                                         sliding_window=None)
    else:
        head_dim = kept.pop("head_dim", None)  # not a Qwen2MoeConfig field; its attention reads it when set
        size = config.intermediate_size
        out = transformers.Qwen2MoeConfig(**kept, num_experts=num_experts, num_experts_per_tok=experts_per_token,
                                          decoder_sparse_step=1, norm_topk_prob=True, use_sliding_window=False,
                                          shared_expert_intermediate_size=size, moe_intermediate_size=size,
                                          qkv_bias=True)
        out.sliding_window = None
        if head_dim is not None:
            out.head_dim = head_dim
    out.architectures = [MOE_CLASSES[inputs.architecture].name]
    out.dtype = dtype
    return out
