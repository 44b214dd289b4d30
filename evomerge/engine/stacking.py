"""Passthrough / layer stacking: a model assembled from layer ranges of several sources (a "frankenmerge").

Output layer k is a copy of layer j of one source, for the layer plan given by the recipe's ``slices``; as in
mergekit (``mergekit/plan.py``: pre-weights planned with the first slice's sources, post-weights with the last
slice's), the embeddings come from the first slice's model and the final norm and head (every other tensor outside
the stack) from the last slice's model; ``recipe.base`` is not read. A slice's ``scale`` s
multiplies the weights (and biases) of the layer's residual-branch output projections (attention output and MLP
down projection), so the layer computes h + s·attn(h) + s·mlp(h'): its contribution to the residual stream is
scaled by s, as in the per-layer scaling of Sakana AI's data-flow merge space (Akiba et al. 2024, arXiv:2403.13187).
The resulting config has the new layer count.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from evomerge.checkpoint import Checkpoint
from evomerge.engine.layout import model_class
from evomerge.naming import layer_index, tensor_filter, with_layer_index
from evomerge.recipe import RecipeError, StackRecipe

#: Residual-branch output projections across families (Llama/Mistral/Qwen: o_proj, down_proj; GPT-2: attn.c_proj,
#: mlp.c_proj; GPT-NeoX: attention.dense, dense_4h_to_h; BERT: attention.output.dense, output.dense).
OUTPUT_PROJECTION = re.compile(
    r"(o_proj|down_proj|c_proj|attention\.dense|dense_4h_to_h|output\.dense)\.(weight|bias)$")


def layer_plan(recipe: StackRecipe, num_layers: Mapping[str, int]) -> list[tuple[str, int, float]]:
    """The output layers as (source model, source layer, scale); checks every range against its source's depth."""
    plan = []
    for i, s in enumerate(recipe.slices):
        depth = num_layers[s.model]
        start, end = s.layer_range
        if end > depth:
            raise RecipeError(f"slices[{i}]: layer_range [{start}, {end}) goes past the {depth} layers of {s.model}")
        plan += [(s.model, j, s.scale) for j in range(start, end)]
    return plan


def is_pre_stack(name: str) -> bool:
    """Whether a tensor outside the layer stack sits before it (embeddings, incl. BERT's ``embeddings.LayerNorm``)
    rather than after it (final norm, lm_head / GPT-NeoX ``embed_out``, BERT pooler)."""
    kind = tensor_filter(name)
    return kind == "embed" or (kind != "lm_head" and "embed" in name)


def stack_layers(recipe: StackRecipe, checkpoints: Mapping[str, Checkpoint]) -> tuple[dict[str, Tensor], object]:
    """Build the stacked model's state dict and config (a copy of the first slice's model's, with the new layer
    count): embeddings from the first slice's model, the other non-layer tensors from the last one's (module doc)."""
    plan = layer_plan(recipe, {p: ck.num_layers for p, ck in checkpoints.items()})
    first, last = checkpoints[recipe.slices[0].model], checkpoints[recipe.slices[-1].model]
    state: dict[str, Tensor] = {n: (first if is_pre_stack(n) else last).get(n)
                                for n in first.names if layer_index(n) is None}
    for k, (model, j, scale) in enumerate(plan):
        ck = checkpoints[model]
        for name in (n for n in ck.names if layer_index(n) == j):
            tensor = ck.get(name)
            if scale != 1.0 and OUTPUT_PROJECTION.search(name):
                tensor = (tensor.to(torch.float32) * scale).to(tensor.dtype)
            state[with_layer_index(name, k)] = tensor
    config = copy.deepcopy(first.config)
    config.num_hidden_layers = len(plan)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [checkpoints[m].config.layer_types[j] for m, j, _ in plan]
    return state, config


def build_stacked_model(recipe: StackRecipe, checkpoints: Mapping[str, Checkpoint], *, device: str | torch.device,
                        dtype: torch.dtype) -> nn.Module:
    """The stacked model as a live ``transformers`` model on ``device`` (a new object: its layer count differs)."""
    state, config = stack_layers(recipe, checkpoints)
    model = model_class(config, list(state)).from_config(config, dtype=dtype)
    model.load_state_dict(state)
    return model.to(device).eval()
