"""Parity with mergekit itself for the methods evomerge took from mergekit 0.1.5's registry (marker ``mergekit``).

Each case writes a mergekit config over the tiny fp32 Llamas (tests/tiny_models.py), runs ``mergekit-yaml`` on it
(its own venv, a subprocess) and ``evomerge merge``'s Python API on the same file, and asserts every tensor equal
bit for bit: mergekit computes these methods in the config's dtype, float32 here, with the same operations.
``EVOMERGE_MERGEKIT_YAML`` points at another mergekit-yaml (default: /tmp/venv-bench/bin/mergekit-yaml).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge import merge_to_dir
from evomerge.recipe import Recipe

MERGEKIT_YAML = Path(os.environ.get("EVOMERGE_MERGEKIT_YAML", "/tmp/venv-bench/bin/mergekit-yaml"))

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not os.access(MERGEKIT_YAML, os.X_OK),
                       reason=f"mergekit-yaml not found at {MERGEKIT_YAML}: install mergekit into its own venv and "
                              "set EVOMERGE_MERGEKIT_YAML"),
]

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


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_tensors_as_mergekit(name: str, tiny_llamas: list[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_llamas, CASES[name])))
    theirs, ours = tmp_path / "mergekit", tmp_path / "evomerge"
    run = subprocess.run([str(MERGEKIT_YAML), str(config), str(theirs), "--no-copy-tokenizer", "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    merge_to_dir(Recipe.from_yaml(config), ours, device="cpu")
    expected, got = load_file(theirs / "model.safetensors"), load_file(ours / "model.safetensors")
    assert sorted(got) == sorted(expected)
    base = load_file(Path(tiny_llamas[0]) / "model.safetensors")
    differ = [n for n in expected if not torch.equal(got[n], expected[n])]
    assert not differ, f"{len(differ)} tensors differ from mergekit's, e.g. {differ[:3]}"
    assert any(not torch.equal(expected[n], base[n]) for n in expected)  # the merge did something
