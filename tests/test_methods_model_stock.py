"""Model Stock against hand-computed interpolation ratios."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.methods.model_stock import model_stock

W = torch.tensor


def test_two_sources_at_45_degrees() -> None:
    base = W([1.0, -1.0])
    sources = base + W([[1.0, 0.0], [1.0, 1.0]])  # cos = 1/sqrt(2)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    average = base + W([1.0, 0.5])
    assert torch.allclose(model_stock(base, sources), t * average + (1 - t) * base)


def test_three_sources_mean_pairwise_cosine() -> None:
    base = torch.zeros(2)
    sources = W([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # pair cosines 1, 0, 0 -> 1/3; t = 1 / (5/3) = 0.6
    assert torch.allclose(model_stock(base, sources), 0.6 * W([2 / 3, 1 / 3]))


def test_filter_wise_uses_one_ratio_per_output_row() -> None:
    base = torch.zeros(2, 2)
    sources = W([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])  # row 0: cos 0 -> t 0; row 1: cos 1 -> t 1
    assert torch.allclose(model_stock(base, sources, filter_wise=True), W([[0.0, 0.0], [1.0, 1.0]]))
    whole = model_stock(base, sources)  # whole tensor: dot 2, norms sqrt(3) -> cos 2/3, t = 4/5
    assert torch.allclose(whole, 0.8 * sources.mean(0))


def test_identical_sources_give_that_model_and_guards() -> None:
    g = torch.Generator().manual_seed(0)
    base, model = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert torch.allclose(model_stock(base, torch.stack([model, model, model])), model, atol=1e-6)
    assert torch.equal(model_stock(base, torch.stack([base, base])), base)  # zero task vectors: 0/0 guarded
    opposite = torch.stack([base + 1.0, base - 1.0])  # cos = -1 -> clamped to 0 -> the base
    assert torch.allclose(model_stock(base, opposite), base)


def test_needs_base_and_two_sources() -> None:
    with pytest.raises(ValueError, match="needs a base model"):
        model_stock(None, torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2 sources"):
        model_stock(torch.zeros(3), torch.ones(1, 3))


def test_model_stock_hand_computed_and_mergekit_guards() -> None:
    base = torch.zeros(2)
    # cos(τ1, τ2) = 1/√2, t = 2c / (1 + c); result t · mean(θ)
    out = model_stock(base, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    c = 2 ** -0.5
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out, torch.tensor([t * 1.0, t * 0.5]), rtol=1e-6, atol=0)
    # opposite task vectors: 1 + (N - 1) cos = 0 -> t = 0, the base (mergekit's singular guard)
    assert torch.equal(model_stock(base + 3, torch.tensor([[4.0, 3.0], [2.0, 3.0]])), torch.full((2,), 3.0))
    # anti-correlated but not opposite: mergekit does not clamp cos to [0, 1], t goes negative (was t = 0)
    out = model_stock(base, torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    c = -(2 ** -0.5)
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out, torch.tensor([0.0, t * 0.5]), rtol=1e-6, atol=1e-7)
