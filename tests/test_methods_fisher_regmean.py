"""Fisher merging and RegMean against hand values and an independent least-squares formulation."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods.fisher import fisher
from evomerge.methods.regmean import regmean

W = torch.tensor


def test_fisher_hand_values_and_floor_fallback() -> None:
    sources = W([[1.0, 2.0], [3.0, 4.0]])
    stats = W([[1.0, 0.0], [3.0, 0.0]])  # entry 1 has no Fisher anywhere -> weighted mean
    # entry 0: (1*1 + 3*3) / (1 + 3) = 2.5; entry 1: (2 + 4) / 2
    assert torch.allclose(fisher(None, sources, weight=W([1.0, 1.0]), stats=stats), W([2.5, 3.0]))
    # weights (1, 3): entry 0: (1*1*1 + 3*3*3) / (1*1 + 3*3) = 2.8; entry 1: (2 + 3*4) / 4
    assert torch.allclose(fisher(None, sources, weight=W([1.0, 3.0]), stats=stats), W([2.8, 3.5]))


def test_fisher_floor_is_relative_to_the_tensor_scale() -> None:
    g = torch.Generator().manual_seed(0)
    sources, stats = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g)
    stats[0, 0] = 0.0
    weight = W([1.0, 2.0, 0.5])
    out = fisher(None, sources, weight=weight, stats=stats, fisher_floor=0.1)
    assert torch.allclose(fisher(None, sources, weight=weight, stats=stats * 1e-12, fisher_floor=0.1), out)
    floored = torch.maximum(stats, 0.1 * stats.mean())
    expected = (weight[:, None] * floored * sources).sum(0) / (weight[:, None] * floored).sum(0)
    assert torch.allclose(out, expected)


def test_fisher_without_stats_or_with_zero_fisher_is_the_weighted_mean() -> None:
    sources, weight = W([[1.0, 2.0], [3.0, 4.0]]), W([1.0, 3.0])
    assert torch.allclose(fisher(None, sources, weight=weight), W([2.5, 3.5]))
    assert torch.allclose(fisher(None, sources, weight=weight, stats=torch.zeros(2, 2)), W([2.5, 3.5]))


def test_fisher_rejects_mismatched_stats() -> None:
    with pytest.raises(ValueError, match="one diagonal Fisher per source"):
        fisher(None, torch.ones(2, 3), weight=W([1.0, 1.0]), stats=torch.ones(3, 3))


def test_regmean_hand_value() -> None:
    sources = W([[[1.0, 0.0]], [[0.0, 1.0]]])  # W1 = [1, 0], W2 = [0, 1] (out 1, in 2)
    stats = W([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])  # model 1 only sees x1, model 2 only x2
    # A = diag(2, 2), B = W1 G1 + W2 G2 = [2, 2] -> W* = [1, 1]: each model's weight for the input it saw
    assert torch.allclose(regmean(None, sources, alpha=1.0, stats=stats), W([[1.0, 1.0]]))


def _least_squares_regmean(xs: list[torch.Tensor], ws: torch.Tensor, alpha: float) -> torch.Tensor:
    """min_W sum_i |X~_i W^T - X~_i W_i^T|^2 with X~_i = [sqrt(a) X_i; sqrt((1 - a) diag(X_i^T X_i))]."""
    rows, targets = [], []
    for x, w in zip(xs, ws.double()):
        x = x.double()
        augmented = torch.cat([alpha**0.5 * x, ((1 - alpha) * torch.diag((x * x).sum(0))).sqrt()])
        rows.append(augmented)
        targets.append(augmented @ w.T)
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.5])
def test_regmean_matches_least_squares_on_concatenated_data(alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(30, 4, generator=g), torch.randn(20, 4, generator=g) * 2 + 1, torch.randn(25, 4, generator=g)]
    ws = torch.randn(3, 5, 4, generator=g)
    stats = torch.stack([x.T @ x for x in xs])
    expected = _least_squares_regmean(xs, ws, alpha).float()
    assert torch.allclose(regmean(None, ws, alpha=alpha, stats=stats), expected, atol=1e-4)


def test_regmean_unseen_input_feature_gets_the_mean_column() -> None:
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(10, 3, generator=g) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0.0  # feature 2 never active
    ws = torch.randn(2, 4, 3, generator=g)
    out = regmean(None, ws, alpha=1.0, stats=torch.stack([x.T @ x for x in xs]))
    assert torch.allclose(out[:, 2], ws[:, :, 2].mean(0))
    expected = _least_squares_regmean([x[:, :2] for x in xs], ws[:, :, :2], 1.0).float()
    assert torch.allclose(out[:, :2], expected, atol=1e-4)


def test_regmean_without_stats_is_the_average_and_checks_shapes() -> None:
    sources = W([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(regmean(None, sources), W([2.0, 4.0]))
    with pytest.raises(ValueError, match=r"one input Gram matrix \[in, in\] per source"):
        regmean(None, torch.ones(2, 3, 4), stats=torch.ones(2, 3, 3))
