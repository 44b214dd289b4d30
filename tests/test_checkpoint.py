"""Tests for evomerge.checkpoint on small hand-made dirs: names, reading, compatibility, pickle policy, export."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import evomerge.checkpoint as ckpt_module
from evomerge.checkpoint import (
    Checkpoint,
    CheckpointError,
    IncompatibleCheckpointsError,
    check_compatible,
    load_state_dict,
    save_hf_dir,
)

LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 10,
}


def header_entries(file: Path) -> dict[str, dict[str, Any]]:
    """Independent reader of a safetensors header: 8-byte little-endian length, then JSON; entries by offset."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))


def write_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    """A model dir written with safetensors directly (not with the code under test)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(LLAMA_CONFIG if config is None else config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def llama_tensors(hidden: int = 8, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(10, hidden, generator=gen)}
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=gen)
        out[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=gen)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=gen)
    out["model.norm.weight"] = torch.randn(hidden, generator=gen)
    out["lm_head.weight"] = torch.randn(10, hidden, generator=gen)
    return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def test_open_single_file_metadata_and_tensors(tmp_path: Path) -> None:
    tensors = llama_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    tensors["model.layers.1.input_layernorm.weight"] = torch.arange(8, dtype=torch.int32)
    model_dir = write_dir(tmp_path / "m", tensors)
    header = header_entries(model_dir / "model.safetensors")
    header_dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "I32": torch.int32}

    with Checkpoint.open(model_dir) as ck:
        assert ck.path == model_dir.resolve()
        assert ck.names == list(header)  # on-disk order
        assert len(ck) == len(tensors)
        for name, entry in header.items():
            assert ck.shape(name) == tuple(entry["shape"])
            assert ck.dtype(name) == header_dtypes[entry["dtype"]]
            assert name in ck
            assert torch.equal(ck.get(name), tensors[name])
            assert ck.get(name).dtype == tensors[name].dtype
        assert "model.layers.2.mlp.up_proj.weight" not in ck
        assert ck.num_layers == 2
        assert ck.architecture == "LlamaForCausalLM"
        assert ck.model_type == "llama"
        assert type(ck.config).__name__ == "LlamaConfig"
        with pytest.raises(KeyError, match="similar names: 'model.layers.1.mlp.up_proj.weight'"):
            ck.get("model.layers.1.mlp.up_proj.weigth")


def test_open_sharded_index(tmp_path: Path) -> None:
    tensors = llama_tensors()
    names = list(tensors)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    first, second = names[:4], names[4:]
    save_file({n: tensors[n] for n in first}, str(model_dir / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in second}, str(model_dir / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00002-of-00002.safetensors" for n in second} | {
        n: "model-00001-of-00002.safetensors" for n in first
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    ck = Checkpoint.open(model_dir)
    expected_order = list(header_entries(model_dir / "model-00002-of-00002.safetensors")) + list(
        header_entries(model_dir / "model-00001-of-00002.safetensors")
    )
    assert ck.names == expected_order  # shards in index order, tensors in on-disk order
    assert all(torch.equal(ck.get(n), tensors[n]) for n in names)
    assert load_state_dict(model_dir).keys() == set(names)

    # an index that places a tensor in a shard without it
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors that it does not contain"):
        Checkpoint.open(model_dir).names
    # an index naming a shard that does not exist
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="do not exist: model-00002-of-00002.safetensors"):
        Checkpoint.open(model_dir)


def test_unknown_model_type_config_is_raw_dict(tmp_path: Path) -> None:
    tensors = {"blocks.0.w": torch.zeros(2), "blocks.4.w": torch.zeros(2)}
    model_dir = write_dir(tmp_path / "m", tensors, {"model_type": "nonexistent-arch", "n_layers": 3})
    ck = Checkpoint.open(model_dir)
    assert ck.config == {"model_type": "nonexistent-arch", "n_layers": 3}
    assert ck.num_layers == 3
    assert ck.architecture == "nonexistent-arch"
    # without a layer count in the config, the highest layer index in the names decides
    other = write_dir(tmp_path / "n", tensors, {"model_type": "nonexistent-arch"})
    assert Checkpoint.open(other).num_layers == 5


def test_open_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    save_file({"w": torch.zeros(1)}, str(no_config / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has no config.json.*found: model.safetensors"):
        Checkpoint.open(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (no_weights / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(no_weights)
    message = str(info.value)
    looked_for = ["model.safetensors", "model.safetensors.index.json"]
    looked_for += ["pytorch_model.bin", "pytorch_model.bin.index.json"]
    assert all(f"{name}," in message or f"{name};" in message for name in looked_for)
    assert "found: config.json, weights.pt" in message


# --------------------------------------------------------------------------------------------------
# Pickle policy
# --------------------------------------------------------------------------------------------------


class NotATensor:
    """A class weights_only unpickling must refuse to construct."""


def pickle_dir(path: Path, payload: object) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    torch.save(payload, path / "pytorch_model.bin")
    return path


def test_pickle_checkpoint_refused_by_default(tmp_path: Path) -> None:
    model_dir = pickle_dir(tmp_path / "m", llama_tensors())
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(model_dir)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for hint in ("pytorch_model.bin", "execute arbitrary code", "allow_pickle=True", "--allow-pickle", "safetensors"):
        assert hint in message


def test_pickle_checkpoint_with_opt_in_reads_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = llama_tensors()
    model_dir = pickle_dir(tmp_path / "m", tensors)
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "load", spy_load)
    ck = Checkpoint.open(model_dir, allow_pickle=True)
    assert ck.names == list(tensors)
    assert ck.shape("model.layers.0.mlp.up_proj.weight") == (16, 8)
    got = ck.get("lm_head.weight")
    assert torch.equal(got, tensors["lm_head.weight"])
    got.zero_()  # a caller's in-place change must not leak into the next read
    assert torch.equal(ck.get("lm_head.weight"), tensors["lm_head.weight"])
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_pickle_with_arbitrary_objects_is_refused_even_with_opt_in(tmp_path: Path) -> None:
    model_dir = pickle_dir(tmp_path / "m", {"w": torch.zeros(2), "payload": NotATensor()})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Checkpoint.open(model_dir, allow_pickle=True).names


def test_sharded_pickle_index_with_opt_in(tmp_path: Path) -> None:
    tensors = llama_tensors()
    names = list(tensors)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    torch.save({n: tensors[n] for n in names[:3]}, model_dir / "pytorch_model-00001-of-00002.bin")
    torch.save({n: tensors[n] for n in names[3:]}, model_dir / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < 3 else 2}-of-00002.bin" for i, n in enumerate(names)}
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json"):
        Checkpoint.open(model_dir)
    ck = Checkpoint.open(model_dir, allow_pickle=True)
    assert ck.is_pickle
    assert ck.names == names
    assert all(torch.equal(ck.get(n), tensors[n]) for n in names)


# --------------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("check_compatible must not read tensor data")

    monkeypatch.setattr(ckpt_module._SafetensorsShard, "get", refuse)


def test_check_compatible_accepts_equal_layouts_with_different_dtypes(tmp_path: Path, no_tensor_reads: None) -> None:
    a = write_dir(tmp_path / "a", llama_tensors(seed=0))
    b = write_dir(tmp_path / "b", {n: t.half() for n, t in llama_tensors(seed=1).items()})
    check_compatible([Checkpoint.open(a), Checkpoint.open(b)])


def test_check_compatible_reports_missing_and_shape(tmp_path: Path, no_tensor_reads: None) -> None:
    base = llama_tensors()
    a = write_dir(tmp_path / "a", base)
    missing = dict(base)
    del missing["model.layers.1.mlp.up_proj.weight"]
    b = write_dir(tmp_path / "b", missing)
    reshaped = dict(base)
    reshaped["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(4, 8)
    c = write_dir(tmp_path / "c", reshaped)
    checkpoints = [Checkpoint.open(p) for p in (a, b, c)]
    with pytest.raises(IncompatibleCheckpointsError) as info:
        check_compatible(checkpoints)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"missing in source 1 ({b.resolve()}): 'model.layers.1.mlp.up_proj.weight'" in message
    assert (
        f"source 2 ({c.resolve()}): 'model.layers.1.self_attn.q_proj.weight' has shape (4, 8), "
        f"source 0 ({a.resolve()}) has (8, 8)"
    ) in message
    assert "2 mismatch(es)" in message


def test_check_compatible_reports_extra_tensor_and_truncates(tmp_path: Path) -> None:
    base = llama_tensors()
    a = write_dir(tmp_path / "a", base)
    extra = dict(base) | {f"extra.{i}": torch.zeros(1) for i in range(7)}
    b = write_dir(tmp_path / "b", extra)
    with pytest.raises(IncompatibleCheckpointsError) as info:
        check_compatible([Checkpoint.open(a), Checkpoint.open(b)], max_reported=5)
    message = str(info.value)
    assert f"source 1 ({b.resolve()}) has extra tensor 'extra.0'" in message
    assert "7 mismatch(es)" in message
    assert message.count("  - ") == 5
    assert "... and 2 more" in message


def test_check_compatible_reports_model_type(tmp_path: Path, no_tensor_reads: None) -> None:
    a = write_dir(tmp_path / "a", llama_tensors())
    gpt2_config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}
    b = write_dir(tmp_path / "b", llama_tensors(), gpt2_config)
    with pytest.raises(IncompatibleCheckpointsError) as info:
        check_compatible([Checkpoint.open(a), Checkpoint.open(b)])
    message = str(info.value)
    assert f"source 1 ({b.resolve()}) has model_type 'gpt2', source 0 ({a.resolve()}) has 'llama'" in message
    assert "is a GPT2LMHeadModel" in message
    with pytest.raises(ValueError, match="at least one"):
        check_compatible([])


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def test_save_single_file_roundtrip(tmp_path: Path) -> None:
    tensors = llama_tensors()
    q_name = "model.layers.0.self_attn.q_proj.weight"
    tensors[q_name] = tensors[q_name].t()  # non-contiguous
    extra = {"recipe.yaml": "method: linear\n", "notes/README.md": "hi"}
    out = save_hf_dir(tensors, tmp_path / "out", config=LLAMA_CONFIG, extra_files=extra)
    assert out == (tmp_path / "out").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes", "recipe.yaml"]
    assert (out / "recipe.yaml").read_text() == "method: linear\n"
    assert (out / "notes" / "README.md").read_text() == "hi"
    assert json.loads((out / "config.json").read_text()) == LLAMA_CONFIG
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    loaded = load_state_dict(out)
    assert list(loaded) == list(header_entries(out / "model.safetensors"))  # safetensors orders the file itself
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_save_sharded_layout_hand_computed(tmp_path: Path) -> None:
    # 400 + 400 + 200 bytes with a 600-byte limit: [a] then [b, c] (b + c = 600 fits exactly)
    tensors = {"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(100), "c": torch.zeros(50)}
    out = save_hf_dir(tensors, tmp_path / "out", config=LLAMA_CONFIG, max_shard_size=600)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 1000},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    assert not (out / "model.safetensors").exists()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(str(out / shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    loaded = load_state_dict(out)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())

    # a tensor above the limit gets a shard of its own: 400 | 400 | 200 with a 300-byte limit
    out3 = save_hf_dir(tensors, tmp_path / "out3", config=LLAMA_CONFIG, max_shard_size=300)
    assert sorted(json.loads((out3 / "model.safetensors.index.json").read_text())["weight_map"].values()) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]


def test_save_ties_and_shared_storage(tmp_path: Path) -> None:
    embed = torch.randn(10, 8)
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(8), "lm_head.weight": embed}
    tied = save_hf_dir(tensors, tmp_path / "tied", config=LLAMA_CONFIG | {"tie_word_embeddings": True})
    assert Checkpoint.open(tied).names == ["model.embed_tokens.weight", "model.norm.weight"]

    untied = save_hf_dir(tensors, tmp_path / "untied", config=LLAMA_CONFIG | {"tie_word_embeddings": False})
    loaded = load_state_dict(untied)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["lm_head.weight"], embed) and torch.equal(loaded["model.embed_tokens.weight"], embed)

    # aliases that are not an embedding/LM-head pair are cloned even when embeddings are tied
    shared = torch.randn(4)
    aliased = {"a.weight": shared, "b.weight": shared, "c.weight": shared[:2]}
    out = save_hf_dir(aliased, tmp_path / "aliased", config=LLAMA_CONFIG | {"tie_word_embeddings": True})
    loaded = load_state_dict(out)
    assert set(loaded) == {"a.weight", "b.weight", "c.weight"}
    assert torch.equal(loaded["b.weight"], shared) and torch.equal(loaded["c.weight"], shared[:2])


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_save_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = ckpt_module.save_file
    written: list[str] = []

    def fail_after_first_shard(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        if written:
            raise RuntimeError("simulated crash while writing shard 2")
        written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", fail_after_first_shard)
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_text("unrelated")
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_hf_dir(llama_tensors(), parent / "out", config=LLAMA_CONFIG, max_shard_size=64)
    assert len(written) == 1 and "model-00001-of-" in written[0]
    assert entries(parent) == ["keep.txt"]  # neither out nor a temp dir


def test_save_existing_dir_refused_then_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old model")
    tensors = llama_tensors()
    with pytest.raises(FileExistsError, match=r"force=True \(CLI: --force\)"):
        save_hf_dir(tensors, out, config=LLAMA_CONFIG)
    assert entries(out) == ["old.txt"]

    # a forced export that fails keeps the old dir untouched
    def crash(*_: Any, **__: Any) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt_module, "save_file", crash)
        with pytest.raises(OSError, match="disk full"):
            save_hf_dir(tensors, out, config=LLAMA_CONFIG, force=True)
    assert entries(out) == ["old.txt"]
    assert entries(tmp_path) == ["out"]

    save_hf_dir(tensors, out, config=LLAMA_CONFIG, force=True)
    assert entries(out) == ["config.json", "model.safetensors"]
    assert entries(tmp_path) == ["out"]  # the renamed-aside old dir is gone too
    assert torch.equal(load_state_dict(out)["lm_head.weight"], tensors["lm_head.weight"])


def test_save_argument_errors_leave_nothing(tmp_path: Path) -> None:
    tensors = llama_tensors()
    empty_tok = tmp_path / "tok"
    empty_tok.mkdir()
    with pytest.raises(CheckpointError, match="none of the tokenizer files"):
        save_hf_dir(tensors, tmp_path / "out", config=LLAMA_CONFIG, tokenizer_dir=empty_tok)
    with pytest.raises(ValueError, match="relative path inside"):
        save_hf_dir(tensors, tmp_path / "out", config=LLAMA_CONFIG, extra_files={"../escape.txt": "x"})
    with pytest.raises(ValueError, match="overwrite"):
        save_hf_dir(tensors, tmp_path / "out", config=LLAMA_CONFIG, extra_files={"config.json": "{}"})
    with pytest.raises(ValueError, match="max_shard_size"):
        save_hf_dir(tensors, tmp_path / "out", config=LLAMA_CONFIG, max_shard_size=0)
    with pytest.raises(ValueError, match="empty"):
        save_hf_dir({}, tmp_path / "out", config=LLAMA_CONFIG)
    assert entries(tmp_path) == ["tok"]
