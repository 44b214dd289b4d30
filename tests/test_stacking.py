"""Passthrough / layer stacking: new layer count, copied layers, residual scaling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from evomerge.merge import merge_to_dir
from evomerge.recipe import StackRecipe


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    a = save_tiny(root / "a", 0, num_layers=3)
    return a, save_tiny(root / "b", 1, noise_of=a, scale=0.2)


def test_stacked_model_has_new_layer_count_and_copied_layers(pair, tmp_path):
    a, b = pair
    recipe = StackRecipe(slices=[
        {"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [1, 3], "scale": 0.5}])
    out = merge_to_dir(recipe, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    wa, wb, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), model.state_dict()
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], wa["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], wb["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"], wb["model.layers.2.self_attn.q_proj.weight"])
    # scale multiplies the residual-branch output projections only
    for got_name, source_name in [("model.layers.3.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"),
                                  ("model.layers.2.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight")]:
        torch.testing.assert_close(got[got_name], 0.5 * wb[source_name])
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_layer_range_past_the_stack(pair, tmp_path):
    a, _ = pair
    recipe = StackRecipe(slices=[{"model": str(a), "layer_range": [1, 5]}])
    with pytest.raises(ValueError, match=r"past the 3 layers"):
        merge_to_dir(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_layer_tensors_come_from_first_and_last_slice_like_mergekit(pair, tmp_path):
    # mergekit/plan.py: pre-weights with slices[0]'s sources, post-weights with slices[-1]'s; the base is not read
    a, b = pair
    recipe = StackRecipe(base=str(a), slices=[
        {"model": str(a), "layer_range": [0, 1]}, {"model": str(b), "layer_range": [1, 3]}])
    got = load_file(merge_to_dir(recipe, tmp_path / "out") / "model.safetensors")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], wb["model.norm.weight"])  # was the base's (a)
    assert torch.equal(got["lm_head.weight"], wb["lm_head.weight"])
    assert not torch.equal(wa["lm_head.weight"], wb["lm_head.weight"])


def test_pre_stack_tensors_by_family():
    from evomerge.engine.stacking import is_pre_stack

    assert is_pre_stack("model.embed_tokens.weight") and is_pre_stack("embeddings.LayerNorm.weight")
    assert is_pre_stack("transformer.wte.weight")
    assert not any(is_pre_stack(n) for n in ["model.norm.weight", "lm_head.weight", "embed_out.weight",
                                             "pooler.dense.weight", "transformer.ln_f.weight"])
