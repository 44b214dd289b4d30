"""Linear merge (model soup) and task arithmetic against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods.linear import linear, task_arithmetic

W = torch.tensor


def test_linear_normalized_and_plain_weighted_sum() -> None:
    sources = W([[1.0, 2.0], [3.0, 6.0]])
    weight = W([1.0, 3.0])
    # (1*1 + 3*3) / 4 = 2.5, (1*2 + 3*6) / 4 = 5
    assert torch.allclose(linear(None, sources, weight=weight), W([2.5, 5.0]))
    assert torch.allclose(linear(None, sources, weight=weight, normalize=False), W([10.0, 20.0]))


def test_linear_ignores_base_and_one_source_is_identity() -> None:
    source = W([[0.5, -1.0, 4.0]])
    assert torch.equal(linear(W([9.0, 9.0, 9.0]), source, weight=W([0.7])), source[0])


def test_linear_all_zero_weights_are_not_divided_by_zero() -> None:
    out = linear(None, W([[1.0], [2.0]]), weight=W([0.0, 0.0]))
    assert torch.equal(out, W([0.0]))


def test_task_arithmetic_hand_values_with_negative_weight() -> None:
    base = W([1.0, 1.0])
    sources = W([[2.0, 0.0], [1.0, 3.0]])  # tau = [1, -1], [0, 2]
    weight = W([1.0, -0.5])
    # sum w tau = [1, -1] + [0, -1] = [1, -2]; lambda 2 -> [2, -4]; + base
    assert torch.allclose(task_arithmetic(base, sources, weight=weight, lam=2.0), W([3.0, -3.0]))
    # normalize: / (1 - 0.5) -> [2, -4]; lambda 2 -> [4, -8]; + base
    out = task_arithmetic(base, sources, weight=weight, lam=2.0, normalize=True)
    assert torch.allclose(out, W([5.0, -7.0]))


def test_task_arithmetic_invariants() -> None:
    g = torch.Generator().manual_seed(0)
    base, sources = torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    one = task_arithmetic(base, sources[:1], weight=W([1.0]), lam=1.0)
    assert torch.allclose(one, sources[0], atol=1e-6)
    assert torch.equal(task_arithmetic(base, sources, weight=W([0.3, 0.9]), lam=0.0), base)


def test_task_arithmetic_does_not_modify_inputs() -> None:
    base, sources = torch.ones(3), torch.full((2, 3), 2.0)
    task_arithmetic(base, sources, weight=W([1.0, 1.0]))
    assert torch.equal(base, torch.ones(3)) and torch.equal(sources, torch.full((2, 3), 2.0))


def test_task_arithmetic_needs_base() -> None:
    with pytest.raises(ValueError, match="needs a base model"):
        task_arithmetic(None, torch.ones(2, 3), weight=W([1.0, 1.0]))
