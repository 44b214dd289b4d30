"""SCE, RAM and RAM+ (evomerge.methods.consensus): hand-computed values, and the engine path on the tiny models
equal to the pure function bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_engine_is_function

from evomerge.methods.consensus import ram, ramplus_tl, sce, sce_select, sce_weights
from evomerge.recipe import Recipe

BASE = torch.tensor([1.0, -1.0, 0.5, 2.0])  # the task vectors below are added to it


def _models(*task_vectors: list[float]) -> torch.Tensor:
    return BASE + torch.tensor(task_vectors)


def test_sce_without_selection_hand_values() -> None:
    sources = _models([1, -2, 0, 3], [3, 2, -1, -1])
    # mean squares 3.5 and 3.75 -> w = 14/29, 15/29; Σ τ = 4, 0, -1, 2 elects +, + (a zero sum), -, +
    # entry 0: both agree -> (14·1 + 15·3)/29; 1: only τ2 (2); 2: only τ2 (-1; τ1's 0 has no sign); 3: only τ1
    expected = BASE + torch.tensor([59 / 29, 2.0, -1.0, 3.0])
    torch.testing.assert_close(sce(BASE, sources), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sce_weights(sources - BASE), torch.tensor([14 / 29, 15 / 29]))


def test_sce_selects_the_entries_of_largest_variance() -> None:
    tau = torch.tensor([[1.0, -2, 0, 3], [3, 2, -1, -1]])
    # population variances 1, 4, .25, 4: nnz 4, k = floor(4 · 0.5) = 2 -> entries 1 and 3
    assert torch.equal(sce_select(tau, 0.5), torch.tensor([0.0, 1, 0, 1]))
    assert torch.equal(sce_select(tau, 0.2), torch.zeros(4))  # k = floor(0.8) = 0
    one = sce_select(tau, 0.3)  # k = 1 of the two tied at variance 4 (the one torch.topk picks)
    assert one.sum() == 1 and one[1] + one[3] == 1
    # τ' = [0, -2, 0, 3], [0, 2, 0, -1]; Σ = 0, 0, 0, 2 elects + everywhere; entry 1 only τ2, entry 3 only τ1
    torch.testing.assert_close(sce(BASE, BASE + tau, select_topk=0.5), BASE + torch.tensor([0.0, 2, 0, 3]))
    assert torch.equal(sce(BASE, BASE + tau, select_topk=0.0), BASE)  # nothing selected: the base


def test_sce_zero_task_vectors_give_the_base_and_it_needs_one() -> None:
    assert torch.equal(sce(BASE, torch.stack([BASE, BASE])), BASE)
    assert torch.equal(sce_weights(torch.zeros(2, 3)), torch.tensor([0.5, 0.5]))  # uniform below 1e-6
    with pytest.raises(ValueError, match="needs a base model"):
        sce(None, torch.zeros(2, 3))


def test_ram_keeps_unique_changes_and_averages_shared_ones() -> None:
    sources = _models([0.5, 0, 0.2, 1e-6], [0.3, 0.4, 0, 0.7], [0.1, 0, -0.2, 0])
    # changed (|τ| > 1e-5): counts 3, 1, 2, 1 -> mean of three; τ2 alone; (0.2 − 0.2)/2; τ2 alone (τ1's 1e-6 drops)
    torch.testing.assert_close(ram(BASE, sources), BASE + torch.tensor([0.3, 0.4, 0.0, 0.7]))
    # a large epsilon: nothing changes
    assert torch.equal(ram(BASE, sources, epsilon=1.0), BASE)


def test_ramplus_scales_each_source_unique_changes_by_its_overlap_ratio() -> None:
    sources = _models([0.5, 0, 0.2, 1e-6], [0.3, 0.4, 0, 0.7], [0.1, 0, -0.2, 0])
    # τ2 shares 1 entry and has 2 unique ones: ρ = 1/2, λ = 1 + 0.5 · min(ρ, 2) = 1.25 on entries 1 and 3;
    # τ1 and τ3 have no unique entry (their λ is capped at 1 + 0.5 · 2 but scales nothing)
    merged = ramplus_tl(BASE, sources, r=0.5, alpha=2.0)
    torch.testing.assert_close(merged, BASE + torch.tensor([0.3, 0.5, 0.0, 0.875]))
    capped = ramplus_tl(BASE, sources, r=0.5, alpha=0.1)  # λ2 = 1 + 0.5 · 0.1
    torch.testing.assert_close(capped, BASE + torch.tensor([0.3, 0.42, 0.0, 0.735]))
    assert torch.equal(ramplus_tl(BASE, sources, r=0.0), ram(BASE, sources))  # r = 0 is RAM


def test_engine_path_is_the_function(tiny_llamas: list[str]) -> None:
    base, fts = tiny_llamas[0], tiny_llamas[1:]
    sources = [{"model": f} for f in fts]
    recipe = Recipe(method="sce", base=base, sources=sources, parameters={"select_topk": 0.6})
    assert assert_engine_is_function(tiny_llamas, recipe, sce, select_topk=0.6) > 0
    recipe = Recipe(method="ram", base=base, sources=sources, parameters={"epsilon": 0.03})
    assert assert_engine_is_function(tiny_llamas, recipe, ram, epsilon=0.03) > 0
    recipe = Recipe(method="ramplus_tl", base=base, sources=sources, parameters={"epsilon": 0.03, "r": 0.5})
    assert assert_engine_is_function(tiny_llamas, recipe, ramplus_tl, epsilon=0.03, r=0.5) > 0
