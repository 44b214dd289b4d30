"""Parity with mergekit-moe itself (marker ``mergekit``): the quick cases of ``benchmarks/moe_parity.py`` (hidden
and cheap_embed gates with prompts from the mini zoo's train splits, seeded random gates, an exported evomerge
recipe, Qwen2-MoE with a shared expert) through ``mergekit-moe`` and ``evomerge merge`` give bit-identical tensors,
routers and the shared expert's gate included; for Qwen2-MoE also the same logits once transformers loads both. Needs
mergekit in its own venv: ``/tmp/venv-bench/bin/mergekit-moe`` (beside ``$EVOMERGE_MERGEKIT_BIN``); skipped
without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from mergekit_tool import mergekit_marks, mergekit_tool
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import moe_parity as parity  # noqa: E402

BINARY = mergekit_tool("mergekit-moe")
pytestmark = mergekit_marks(BINARY)

QUICK = [c for c in parity.CASES if c.quick]


@pytest.mark.parametrize("case", QUICK, ids=[c.name for c in QUICK])
def test_mergekit_moe_config_gives_mergekit_moes_tensors(case: parity.Case, mini_zoo, tmp_path: Path) -> None:  # noqa: ANN001
    result = parity.run_case(case, mini_zoo, BINARY, tmp_path)
    assert result.error is None, result.error
    assert set(result.diffs) == set(case.groups)
    assert all(d.tensors > 0 for d in result.diffs.values())
    worst = {g: d.max_ulp for g, d in result.diffs.items()}
    assert all(ulp == 0 for ulp in worst.values()), f"{case.name}: max ulp per group {worst}"
    if case.shared:  # the configs too: both dirs load as the same Qwen2-MoE and compute the same logits
        ids = torch.tensor([[0, 5, 9, 17, 3, 22, 8]])
        models = [AutoModelForCausalLM.from_pretrained(tmp_path / case.name / tool).eval()
                  for tool in ("evomerge", "mergekit")]
        assert [type(m).__name__ for m in models] == ["Qwen2MoeForCausalLM"] * 2
        with torch.no_grad():
            ours, theirs = (m(ids).logits for m in models)
        assert torch.equal(ours, theirs)
