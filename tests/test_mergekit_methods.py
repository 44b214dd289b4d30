"""Parity with mergekit itself for the methods evomerge took from mergekit 0.1.5's registry (marker ``mergekit``).

Each case writes a mergekit config over the tiny fp32 Llamas (tests/tiny_models.py), runs ``mergekit-yaml`` on it
(its own venv, a subprocess) and ``evomerge merge``'s Python API on the same file, and asserts every tensor equal
bit for bit: mergekit computes these methods in the config's dtype, float32 here, with the same operations; bf16
checkpoints give the same bf16 tensors when mergekit computes in float32 too.
``EVOMERGE_MERGEKIT_BIN`` points at another mergekit-yaml (default: /tmp/venv-bench/bin/mergekit-yaml).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mergekit_tool import mergekit_marks, mergekit_tool
from safetensors.torch import load_file, save_file

from evomerge.merge import merge_to_dir
from evomerge.recipe import Recipe, load_recipe
from evomerge.recipe.mergekit import to_mergekit

MERGEKIT_YAML = mergekit_tool()

pytestmark = mergekit_marks(MERGEKIT_YAML)

Case = tuple[str, bool, list[tuple[int, dict[str, Any]]], dict[str, Any]]
# name -> (merge_method, with base_model, models as (index into tiny_llamas: 0 the base, parameters), parameters)
CASES: dict[str, Case] = {
    "nearswap": ("nearswap", True, [(1, {})], {"t": 0.02}),
    "arcee_fusion": ("arcee_fusion", True, [(2, {})], {}),
    "sce": ("sce", True, [(1, {}), (2, {}), (3, {})], {"select_topk": 0.6}),
    "sce_no_selection": ("sce", True, [(1, {}), (2, {})], {}),
    "ram": ("ram", True, [(1, {}), (2, {}), (3, {})], {"epsilon": 0.03}),
    "ramplus_tl": ("ramplus_tl", True, [(1, {}), (2, {}), (3, {})], {"epsilon": 0.03, "r": 0.5, "alpha": 0.4}),
    "nuslerp": ("nuslerp", False, [(1, {"weight": 0.3}), (2, {"weight": 0.7})], {}),
    "nuslerp_rows_base": ("nuslerp", True, [(1, {"weight": 1.0}), (3, {"weight": 1.75})], {"nuslerp_flatten": False}),
    "nuslerp_columns": ("nuslerp", False, [(2, {"weight": 1.3}), (3, {"weight": 0.7})],
                        {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "karcher": ("karcher", False, [(1, {}), (2, {}), (3, {})], {"max_iter": 3, "tol": 1e-4}),
    "karcher_base_added": ("karcher", True, [(1, {}), (2, {})], {}),  # mergekit appends the base as an input
    "karcher_base_listed": ("karcher", True, [(2, {}), (0, {}), (1, {})], {}),
}


def _config(paths: list[str], case: Case) -> dict[str, Any]:
    method, with_base, models, parameters = case
    config: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
    if with_base:
        config["base_model"] = paths[0]
    config["models"] = [{"model": paths[i], **({"parameters": p} if p else {})} for i, p in models]
    if parameters:
        config["parameters"] = parameters
    return config


def _mergekit_and_evomerge(theirs: dict[str, Any], ours: dict[str, Any], tmp_path: Path
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors mergekit-yaml writes for config ``theirs`` and those ``evomerge merge`` writes for ``ours``."""
    (tmp_path / "mergekit.yaml").write_text(yaml.safe_dump(theirs))
    (tmp_path / "evomerge.yaml").write_text(yaml.safe_dump(ours))
    run = subprocess.run(
        [str(MERGEKIT_YAML), str(tmp_path / "mergekit.yaml"), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    merge_to_dir(load_recipe(tmp_path / "evomerge.yaml"), tmp_path / "ev", device="cpu")
    expected, got = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "ev" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    return expected, got


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], base_dir: str) -> None:
    differ = [n for n in expected if not torch.equal(got[n], expected[n])]
    assert not differ, f"{len(differ)} tensors differ from mergekit's, e.g. {differ[:3]}"
    base = load_file(Path(base_dir) / "model.safetensors")
    assert any(not torch.equal(expected[n], base[n].to(expected[n].dtype)) for n in expected)  # it merged


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_tensors_as_mergekit(name: str, tiny_llamas: list[str], tmp_path: Path) -> None:
    config = _config(tiny_llamas, CASES[name])
    _assert_same(*_mergekit_and_evomerge(config, config, tmp_path), tiny_llamas[0])


@pytest.fixture(scope="module")
def bf16_llamas(tiny_llamas: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The tiny Llamas stored in bfloat16."""
    out = []
    for path in map(Path, tiny_llamas):
        copy = tmp_path_factory.mktemp(f"bf16-{path.name}")
        for file in ("config.json", "generation_config.json"):
            shutil.copy(path / file, copy / file)
        weights = load_file(path / "model.safetensors")
        save_file({n: t.to(torch.bfloat16) for n, t in weights.items()}, copy / "model.safetensors",
                  metadata={"format": "pt"})
        out.append(str(copy))
    return out


@pytest.mark.parametrize("name", ["nearswap", "arcee_fusion", "sce", "ram", "ramplus_tl", "nuslerp", "karcher"])
def test_bfloat16_checkpoints_computed_in_float32(name: str, bf16_llamas: list[str], tmp_path: Path) -> None:
    """bf16 checkpoints: mergekit with ``dtype: float32, out_dtype: bfloat16`` computes in fp32 and rounds once, as
    evomerge always does (``dtype: bfloat16`` in evomerge is the stored dtype): the same bf16 tensors. (mergekit's
    ``dtype: bfloat16`` computes every step in bf16: hundreds of bf16 ulps away on some entries.)"""
    config = _config(bf16_llamas, CASES[name])
    theirs = {**config, "dtype": "float32", "out_dtype": "bfloat16"}
    expected, got = _mergekit_and_evomerge(theirs, {**config, "dtype": "bfloat16"}, tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in [*expected.values(), *got.values()])
    _assert_same(expected, got, bf16_llamas[0])


@pytest.mark.parametrize("method", ["karcher", "nuslerp", "sce"])
def test_exported_recipe_gives_mergekit_the_same_model(method: str, tiny_llamas: list[str], tmp_path: Path) -> None:
    """The other direction: an evomerge recipe (as a search writes it: a base, sources with their parameters)
    exported by to_mergekit and run by mergekit-yaml gives the model ``evomerge merge`` makes of the recipe."""
    base, fts = tiny_llamas[0], tiny_llamas[1:3]
    params: dict[str, dict[str, Any]] = {"karcher": {"max_iter": 5}, "nuslerp": {"nuslerp_flatten": False},
                                         "sce": {"select_topk": 0.4}}
    weights = [{"weight": 0.6}, {"weight": 1.4}] if method == "nuslerp" else [{}, {}]
    recipe = Recipe(method=method, base=base, parameters=params[method], dtype="float32",
                    sources=[{"model": f, "parameters": w} for f, w in zip(fts, weights)])
    ours = yaml.safe_load(recipe.to_yaml())
    _assert_same(*_mergekit_and_evomerge(to_mergekit(recipe), ours, tmp_path), base)


@pytest.mark.parametrize(("with_base", "normalize_weights"), [(False, True), (True, True), (True, False)])
def test_multislerp_is_mergekits_bit_for_bit(with_base: bool, normalize_weights: bool, tiny_llamas: list[str],
                                             tmp_path: Path) -> None:
    """multislerp: mergekit's definition (the renormalised weighted mean of the directions at the weighted mean
    norm, plus an exponential-map step along a tangent vector that is zero up to rounding), computed with its
    operations in float32: the tensors are mergekit's bit for bit, with the weights normalised or as given. (Forming
    per-source coefficients in float64 instead, as evomerge did before, lands up to 2.2e-8 away.)"""
    models = [(1, {"weight": 0.3}), (2, {"weight": 0.5}), (3, {"weight": 0.9})]
    config = _config(tiny_llamas, ("multislerp", with_base, models, {"normalize_weights": normalize_weights}))
    expected, got = _mergekit_and_evomerge(config, config, tmp_path)
    _assert_same(expected, got, tiny_llamas[0])


