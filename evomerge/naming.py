"""Tensor names: which transformer block a tensor belongs to, and its coarse kind (attention, MLP, ...).

Plain string rules with no torch or transformers import, so recipes, search spaces and reports can name tensors
without loading a model. :func:`layer_index` / :func:`with_layer_index` find and rewrite the block index inside a
tensor name; :func:`tensor_filter` / :func:`matches_filter` put a tensor into a coarse kind for per-filter merge
parameters.
"""

from __future__ import annotations

import re

__all__ = ["FILTERS", "layer_index", "matches_filter", "tensor_filter", "with_layer_index"]


# One path segment naming a stack of blocks, followed by the block's integer index. The leftmost match
# wins, so a nested index (T5's ``block.N.layer.M``) resolves to the outer block N.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")


def _layer_match(name: str) -> re.Match[str] | None:
    return _LAYER_RE.search(name)


def layer_index(name: str) -> int | None:
    """Index of the transformer block a tensor belongs to, or ``None`` for non-layer tensors.

    The index is the integer path segment after the first block-stack segment (``layers``, ``layer``,
    ``h``, ``blocks`` or ``block``). This covers the common families:

    ==========================================  =============================================
    family                                      example name -> index
    ==========================================  =============================================
    Llama / Mistral / Qwen2 / Gemma / Phi-3     ``model.layers.7.self_attn.q_proj.weight`` -> 7
    GPT-2 / Falcon                              ``transformer.h.3.attn.c_attn.weight`` -> 3
    GPT-NeoX / Pythia                           ``gpt_neox.layers.2.mlp.dense_h_to_4h.weight`` -> 2
    BERT / RoBERTa (with or without prefix)     ``bert.encoder.layer.5.output.dense.bias`` -> 5
    T5-like                                     ``encoder.block.1.layer.0.SelfAttention.q.weight`` -> 1
    OPT                                         ``model.decoder.layers.4.fc1.weight`` -> 4
    fallback                                    any ``.layers.N.`` / ``.layer.N.`` / ``.h.N.`` /
                                                ``.blocks.N.`` / ``.block.N.`` segment
    ==========================================  =============================================

    Embeddings, the final norm and the LM head have no block segment and give ``None``. Encoder-decoder
    models number their encoder and decoder stacks independently; both map to the same indices.
    """
    match = _layer_match(name)
    return None if match is None else int(match.group(1))


def with_layer_index(name: str, new_index: int) -> str:
    """``name`` with its block index (see :func:`layer_index`) replaced by ``new_index``.

    Used by layer stacking: layer 3 of a source becomes layer 7 of the output, e.g.
    ``with_layer_index("model.layers.3.mlp.up_proj.weight", 7) == "model.layers.7.mlp.up_proj.weight"``.
    Raises ``ValueError`` for a name without a block index or a negative index.
    """
    if new_index < 0:
        raise ValueError(f"layer index must be >= 0, got {new_index} for {name!r}")
    match = _layer_match(name)
    if match is None:
        raise ValueError(f"tensor {name!r} has no layer index to replace (it is not inside a transformer block)")
    start, end = match.span(1)
    return f"{name[:start]}{new_index}{name[end:]}"


#: The kinds :func:`tensor_filter` returns.
FILTERS: tuple[str, ...] = ("self_attn", "mlp", "embed", "norm", "lm_head", "other")

# Kind rules on single path segments, tried in this order; the first kind with a matching segment wins.
_LM_HEAD_SEG = re.compile(r"^(?:lm_head|embed_out)$")
_NORM_SEG = re.compile(r"norm|^ln(?:_|$)", re.IGNORECASE)
_EMBED_SEG = re.compile(r"embed|^(?:wte|wpe|shared)$", re.IGNORECASE)
_ATTN_SEG = re.compile(
    r"attn|attention|^(?:q|k|v|o|qkv)_proj$|^(?:query|key|value|query_key_value)$", re.IGNORECASE
)
_MLP_SEG = re.compile(
    r"^(?:mlp|feed_forward|ffn|intermediate|DenseReluDense|fc1|fc2|c_fc|gate_proj|up_proj|down_proj"
    r"|gate_up_proj|dense_h_to_4h|dense_4h_to_h|experts|block_sparse_moe|w1|w2|w3)$",
    re.IGNORECASE,
)
_KIND_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lm_head", _LM_HEAD_SEG),
    ("norm", _NORM_SEG),
    ("embed", _EMBED_SEG),
    ("self_attn", _ATTN_SEG),
    ("mlp", _MLP_SEG),
)


def tensor_filter(name: str) -> str:
    """Coarse kind of a tensor, from the segments of its dotted name.

    Rules are tried top to bottom; the first whose pattern matches any path segment decides. Norms are
    checked before attention and embeddings so that ``post_attention_layernorm``,
    ``attention.output.LayerNorm`` and ``embeddings.LayerNorm`` count as norms.

    ===========  ====================================================================================
    kind         a segment that ...
    ===========  ====================================================================================
    lm_head      is ``lm_head`` or ``embed_out`` (GPT-NeoX)
    norm         contains ``norm`` (any case: ``norm``, ``layernorm``, ``LayerNorm``, ``layer_norm``,
                 ``q_norm``) or is ``ln`` / starts with ``ln_`` (GPT-2 ``ln_1``, ``ln_f``)
    embed        contains ``embed`` (``embed_tokens``, ``embeddings``, ``word_embeddings``,
                 ``embed_positions``, ``embed_in``) or is ``wte``, ``wpe``, ``shared`` (T5)
    self_attn    contains ``attn`` / ``attention`` (``self_attn``, ``attn``, ``self_attention``,
                 ``SelfAttention``), or is ``q_proj``/``k_proj``/``v_proj``/``o_proj``/``qkv_proj``,
                 ``query``/``key``/``value``/``query_key_value``
    mlp          is ``mlp``, ``feed_forward``, ``ffn``, ``intermediate``, ``DenseReluDense``,
                 ``fc1``/``fc2``, ``c_fc``, ``gate_proj``/``up_proj``/``down_proj``/``gate_up_proj``,
                 ``dense_h_to_4h``/``dense_4h_to_h``, ``experts``, ``block_sparse_moe``,
                 ``w1``/``w2``/``w3``; or is ``output`` inside a layer (BERT's FFN ``output.dense``;
                 the attention ``attention.output`` was already claimed by self_attn)
    other        anything else (poolers, classifier heads, ``cls.predictions``)
    ===========  ====================================================================================
    """
    segments = name.split(".")
    for kind, pattern in _KIND_RULES:
        if any(pattern.search(segment) for segment in segments):
            return kind
    if "output" in segments and layer_index(name) is not None:
        return "mlp"
    return "other"


def matches_filter(name: str, filter: str) -> bool:
    """Whether tensor ``name`` is selected by ``filter``.

    ``filter`` selects a tensor when it is the tensor's kind (:func:`tensor_filter`) or, with mergekit's
    semantics, a substring of the name. So ``"self_attn"`` selects GPT-2's ``attn.c_attn.weight`` (by
    kind) and OPT's ``self_attn_layer_norm.weight`` (by substring), and ``"q_proj"`` selects only query
    projections.
    """
    return tensor_filter(name) == filter or filter in name
