"""Tensor naming: block index and filter kind for the common model families (evomerge.naming)."""

from __future__ import annotations

import pytest

from evomerge.naming import layer_index, matches_filter, tensor_filter, with_layer_index

# --------------------------------------------------------------------------------------------------
# Layer index
# --------------------------------------------------------------------------------------------------

LAYER_NAMES = [
    ("model.layers.0.self_attn.q_proj.weight", 0),  # Llama / Mistral / Qwen2
    ("model.layers.31.mlp.down_proj.weight", 31),
    ("model.layers.7.self_attn.qkv_proj.weight", 7),  # Phi-3
    ("model.layers.12.pre_feedforward_layernorm.weight", 12),  # Gemma 2
    ("transformer.h.3.attn.c_attn.weight", 3),  # GPT-2
    ("transformer.h.11.mlp.c_proj.bias", 11),
    ("transformer.h.5.self_attention.query_key_value.weight", 5),  # Falcon
    ("gpt_neox.layers.2.attention.query_key_value.weight", 2),  # GPT-NeoX
    ("gpt_neox.layers.10.mlp.dense_4h_to_h.bias", 10),
    ("encoder.layer.4.attention.self.query.weight", 4),  # BERT, no prefix
    ("bert.encoder.layer.5.output.dense.bias", 5),
    ("roberta.encoder.layer.9.intermediate.dense.weight", 9),
    ("encoder.block.1.layer.0.SelfAttention.q.weight", 1),  # T5: outer block index wins
    ("decoder.block.2.layer.1.EncDecAttention.k.weight", 2),
    ("model.decoder.layers.4.fc1.weight", 4),  # OPT
    ("model.language_model.layers.6.mlp.gate_proj.weight", 6),  # fallback: nested language model
    ("vision_tower.blocks.8.attn.proj.weight", 8),  # fallback: .blocks.N.
    ("layers.3.attention.wq.weight", 3),  # fallback at the start of the name
    ("model.layers.13", 13),  # index as last segment
]

NON_LAYER_NAMES = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.ln_f.bias",
    "gpt_neox.embed_in.weight",
    "gpt_neox.final_layer_norm.weight",
    "embed_out.weight",
    "bert.embeddings.word_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "pooler.dense.weight",
    "shared.weight",
    "model.decoder.final_layer_norm.weight",
    "model.layers_extra.3.weight",  # segment is not exactly a block-stack name
    "transformer.head.0.weight",
    "model.hidden.3.weight",
    "model.layers.x.weight",  # no integer index
]


@pytest.mark.parametrize(("name", "expected"), LAYER_NAMES)
def test_layer_index_families(name: str, expected: int) -> None:
    assert layer_index(name) == expected


@pytest.mark.parametrize("name", NON_LAYER_NAMES)
def test_layer_index_non_layer_is_none(name: str) -> None:
    assert layer_index(name) is None


@pytest.mark.parametrize(
    ("name", "new", "expected"),
    [
        ("model.layers.3.mlp.up_proj.weight", 7, "model.layers.7.mlp.up_proj.weight"),
        ("model.layers.12.self_attn.o_proj.weight", 0, "model.layers.0.self_attn.o_proj.weight"),
        ("transformer.h.0.ln_1.weight", 23, "transformer.h.23.ln_1.weight"),
        ("bert.encoder.layer.5.output.dense.bias", 10, "bert.encoder.layer.10.output.dense.bias"),
        # only the outer T5 block index changes, the inner sub-layer index stays
        ("encoder.block.1.layer.1.DenseReluDense.wi.weight", 4, "encoder.block.4.layer.1.DenseReluDense.wi.weight"),
        ("model.layers.2", 11, "model.layers.11"),
    ],
)
def test_with_layer_index(name: str, new: int, expected: str) -> None:
    assert with_layer_index(name, new) == expected
    assert layer_index(with_layer_index(name, new)) == new


def test_with_layer_index_errors() -> None:
    with pytest.raises(ValueError, match="no layer index"):
        with_layer_index("model.embed_tokens.weight", 1)
    with pytest.raises(ValueError, match=">= 0"):
        with_layer_index("model.layers.1.mlp.up_proj.weight", -1)


# --------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------

FILTER_NAMES = [
    ("model.layers.0.self_attn.q_proj.weight", "self_attn"),
    ("model.layers.0.self_attn.o_proj.weight", "self_attn"),
    ("model.layers.0.mlp.gate_proj.weight", "mlp"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.0.post_attention_layernorm.weight", "norm"),  # contains "attention" but is a norm
    ("model.layers.0.self_attn.q_norm.weight", "norm"),
    ("model.embed_tokens.weight", "embed"),
    ("model.norm.weight", "norm"),
    ("lm_head.weight", "lm_head"),
    ("transformer.wte.weight", "embed"),
    ("transformer.wpe.weight", "embed"),
    ("transformer.h.0.ln_1.weight", "norm"),
    ("transformer.h.0.attn.c_attn.weight", "self_attn"),
    ("transformer.h.0.attn.c_proj.weight", "self_attn"),
    ("transformer.h.0.mlp.c_fc.weight", "mlp"),
    ("transformer.h.0.mlp.c_proj.weight", "mlp"),
    ("transformer.ln_f.weight", "norm"),
    ("gpt_neox.embed_in.weight", "embed"),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "self_attn"),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp"),
    ("embed_out.weight", "lm_head"),
    ("bert.embeddings.word_embeddings.weight", "embed"),
    ("embeddings.position_ids", "embed"),
    ("embeddings.LayerNorm.weight", "norm"),
    ("encoder.layer.0.attention.self.key.weight", "self_attn"),
    ("encoder.layer.0.attention.output.dense.weight", "self_attn"),
    ("encoder.layer.0.attention.output.LayerNorm.bias", "norm"),
    ("encoder.layer.0.intermediate.dense.weight", "mlp"),
    ("encoder.layer.0.output.dense.weight", "mlp"),  # BERT FFN output projection
    ("encoder.layer.0.output.LayerNorm.weight", "norm"),
    ("pooler.dense.weight", "other"),
    ("model.decoder.layers.0.self_attn_layer_norm.weight", "norm"),  # OPT
    ("model.decoder.layers.0.fc2.weight", "mlp"),
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "mlp"),  # T5
    ("encoder.block.0.layer.0.SelfAttention.v.weight", "self_attn"),
    ("shared.weight", "embed"),
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", "mlp"),  # Mixtral
    ("classifier.weight", "other"),
    ("output.weight", "other"),  # outside a layer, "output" is not an FFN
]


@pytest.mark.parametrize(("name", "kind"), FILTER_NAMES)
def test_tensor_filter(name: str, kind: str) -> None:
    assert tensor_filter(name) == kind


@pytest.mark.parametrize(
    ("name", "flt", "expected"),
    [
        ("transformer.h.0.attn.c_attn.weight", "self_attn", True),  # by kind
        ("encoder.layer.0.intermediate.dense.weight", "mlp", True),  # by kind
        ("model.decoder.layers.0.self_attn_layer_norm.weight", "self_attn", True),  # by substring
        ("model.decoder.layers.0.self_attn_layer_norm.weight", "norm", True),  # by kind
        ("model.layers.0.self_attn.q_proj.weight", "q_proj", True),  # plain substring
        ("model.layers.0.self_attn.k_proj.weight", "q_proj", False),
        ("model.layers.0.mlp.up_proj.weight", "self_attn", False),
        ("model.layers.0.post_attention_layernorm.weight", "self_attn", False),
        ("lm_head.weight", "embed", False),
    ],
)
def test_matches_filter(name: str, flt: str, expected: bool) -> None:
    assert matches_filter(name, flt) is expected
