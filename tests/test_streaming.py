"""The tensor-by-tensor merge behind ``evomerge merge``: the engine's bits, one shard in memory at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_family

import evomerge.checkpoint
from evomerge.engine import MergeEngine
from evomerge.engine.streaming import stream_merge
from evomerge.merge import merge_to_dir
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    base, fts = tiny_family(tmp_path_factory.mktemp("family"), n=3)
    return str(base), [str(f) for f in fts]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


RECIPES = {
    "linear": ({}, {"weight": [0.0, 1.0]}, False),
    "task_arithmetic": ({"lambda": 0.7}, {"weight": {"mlp": 0.5, "default": 1.2}}, True),
    "ties": ({"density": [0.2, 0.8]}, {"weight": 0.9}, True),
    "dare_ties": ({"density": 0.4}, {"weight": 1.0}, True),
    "della": ({"density": 0.5, "epsilon": 0.1}, {"weight": 1.0}, True),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, {"weight": 1.0}, True),
    "model_stock": ({}, {}, True),
    "slerp": ({"t": [0.2, 0.9]}, {}, False),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_streamed_merge_is_the_engines_bits(family, tmp_path, method, dtype):
    base, fts = family
    params, per_source, with_base = RECIPES[method]
    sources = fts[:2] if method == "slerp" else fts
    recipe = Recipe(method=method, base=base if with_base else None, parameters=params, seed=5, dtype=dtype,
                    sources=[{"model": p, "parameters": per_source} for p in sources])
    engine = MergeEngine(recipe.model_paths(), device="cpu", dtype=dtype)
    engine.materialize(recipe)
    expected = _weights(engine.export(tmp_path / "engine"))
    streamed = _weights(stream_merge(recipe, tmp_path / "streamed"))
    assert set(streamed) == set(expected)
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name


def test_one_shard_is_produced_at_a_time_and_the_index_names_every_tensor(family, tmp_path, monkeypatch):
    """With small shards, each shard's tensors are merged only after the previous shard was written."""
    base, fts = family
    recipe = Recipe(method="ties", base=base, parameters={"density": 0.5},
                    sources=[{"model": p, "parameters": {"weight": 1.0}} for p in fts])
    produced: list[str] = []
    written: list[tuple[int, list[str]]] = []
    real_get = evomerge.checkpoint.LazyTensors.__init__

    def recording_init(self, nbytes, get):  # type: ignore[no-untyped-def]
        def get_and_record(name: str) -> torch.Tensor:
            produced.append(name)
            return get(name)
        real_get(self, nbytes, get_and_record)

    real_save = evomerge.checkpoint.save_file

    def recording_save(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        written.append((len(produced), list(tensors)))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(evomerge.checkpoint.LazyTensors, "__init__", recording_init)
    monkeypatch.setattr(evomerge.checkpoint, "save_file", recording_save)
    out = merge_to_dir(recipe, tmp_path / "out", max_shard_size=4096)
    assert len(written) > 2
    done = 0
    for produced_before, names in written:
        done += len(names)
        assert produced_before == done  # the shard's own tensors, nothing of the next shard yet
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(produced)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _weights(out).values())


def test_bad_parameters_fail_before_any_tensor_is_merged(family, tmp_path):
    base, fts = family
    recipe = Recipe(method="ties", base=base, parameters={"density": [0.5, 1.5]},
                    sources=[{"model": p} for p in fts])
    with pytest.raises(ValueError, match="density"):
        stream_merge(recipe, tmp_path / "out")
    assert not any(tmp_path.iterdir())
