"""Exact radix-select magnitude thresholds and the masks built on them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from evomerge.methods import magnitude_threshold
from evomerge.methods.select import (
    SortedMagnitudes,
    magnitude_ranks,
    radix_kth_largest_rows,
    sorted_search_ranks,
    topk_kth_largest_rows,
)
from evomerge.methods.sparsify import band_keep_counts, ties_keep_count, top_magnitude_mask


def _reference(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(values.reshape(-1), k).values[-1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4097, 65_537, 1_000_000])
def test_threshold_equals_topk_on_random_tensors(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).abs()
    ks = {1, n, max(1, n // 2), max(1, n // 5), int(torch.randint(1, n + 1, (1,), generator=g))}
    for k in sorted(ks):
        assert torch.equal(magnitude_threshold(values, k), _reference(values, k)), k


@pytest.mark.parametrize(
    "values",
    [
        torch.tensor([0.0, 0.0, 0.0, 0.0]),  # all zeros
        torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.0]),  # duplicates
        torch.tensor([3e-39, 1e-45, 0.0, 2e-38]),  # subnormals share the lowest high-bit buckets
        torch.tensor([float("inf"), 1.0, 2.0, float("inf")]),
        torch.tensor([1.0, 1.0000001, 1.0000002, 0.99999994]),  # same high bits, differ in the low bits
    ],
)
def test_threshold_with_ties_zeros_and_extremes(values: torch.Tensor) -> None:
    for k in range(1, values.numel() + 1):
        assert torch.equal(magnitude_threshold(values, k), _reference(values, k)), k


def test_bf16_like_values_with_many_duplicates() -> None:
    g = torch.Generator().manual_seed(1)
    values = torch.randn(50_000, generator=g).to(torch.bfloat16).float().abs()
    for k in [1, 17, 10_000, 25_000, 49_999, 50_000]:
        assert torch.equal(magnitude_threshold(values, k), _reference(values, k))


@pytest.mark.parametrize("select", [radix_kth_largest_rows, topk_kth_largest_rows])
def test_batched_rows_are_independent(select: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(4, 3000, generator=g).abs()
    rows[1] = rows[0]  # identical rows with different k
    rows[2, :2000] = 0.0
    for k in [torch.tensor([1, 2999, 1500, 3000]), torch.tensor([700] * 4), torch.tensor([3000] * 4)]:
        expected = torch.stack([_reference(rows[r], int(k[r])) for r in range(4)])
        assert torch.equal(select(rows, k), expected), k


def test_threshold_rejects_k_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        magnitude_threshold(torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        magnitude_threshold(torch.ones(3), 4)


def test_ties_keep_count_is_mergekits_floor_with_at_least_one() -> None:
    # mergekit/sparsify.py magnitude(): d >= 1 all, d <= 0 none, else max(1, int(d * n)) (was round half up)
    assert ties_keep_count(torch.tensor([0.0, 0.25, 0.2, 0.28125, 1.0, 0.05]), 10).tolist() == [0, 2, 2, 2, 10, 1]
    assert ties_keep_count(torch.tensor([0.125, 0.375, 1.5, -0.1]), 4).tolist() == [1, 1, 4, 0]
    # counted from the float64 value as mergekit's Python float: 0.35 * 100 = 35 (float32's 0.35 would give 34)
    assert ties_keep_count(torch.tensor([0.35], dtype=torch.float64), 100).tolist() == [35]


def test_band_keep_counts_shrink_the_outlier_drop_like_mergekit() -> None:
    # magnitude_outliers(): k_d = int(d n), n_top = int(g n), kept ranks [n - k_d - k_top, n - k_top) ascending
    outer, top = band_keep_counts(torch.tensor([0.5, 0.9, 0.95, 1.0], dtype=torch.float64),
                                  torch.tensor([0.1, 0.2, 0.01, 0.3], dtype=torch.float64), 100)
    assert top.tolist() == [10, 10, 1, 0]  # 0.9 + 0.2 > 1: only n - k_d = 10 outliers go; d = 1 keeps all
    assert outer.tolist() == [60, 100, 96, 100]


def test_mask_keeps_exactly_k_without_ties_and_all_ties_at_threshold() -> None:
    tau = torch.tensor([[0.3, -5.0, 2.0, -0.1, 1.0], [1.0, -1.0, 1.0, 0.5, 0.0]])
    mask = top_magnitude_mask(tau, torch.tensor([0.4, 0.4]))  # k = 2 per row
    assert mask[0].tolist() == [False, True, True, False, False]  # |-5|, |2|: exactly k
    assert mask[1].tolist() == [True, True, True, False, False]  # three entries tie at the threshold 1: all kept


def test_mask_k_zero_keeps_nothing_and_full_density_keeps_everything() -> None:
    tau = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    assert top_magnitude_mask(tau, torch.tensor([0.1, 0.0])).tolist() == [[False, False, True], [False] * 3]
    assert top_magnitude_mask(tau, torch.tensor([1.0, 1.0])).all()


def test_mask_count_equals_reference_count_on_random_data() -> None:
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(3, 40, 25, generator=g).round(decimals=1)  # many ties
    density = torch.tensor([0.1, 0.5, 0.9])
    mask = top_magnitude_mask(tau, density)
    for i in range(3):
        k = int(ties_keep_count(density[i : i + 1], 1000))
        threshold = _reference(tau[i].abs(), k)
        assert torch.equal(mask[i], tau[i].abs() >= threshold)
        assert mask[i].sum() >= k


def test_sorted_magnitudes_answer_every_k_like_topk() -> None:
    g = torch.Generator().manual_seed(3)
    values = torch.randn(20_000, generator=g).abs()
    values[:5000] = values[:5000].to(torch.bfloat16).float()  # many ties
    values[5000:5100] = 0.0
    values[5100] = 1e-40  # a subnormal
    table = SortedMagnitudes.build(values.view(100, 200))
    assert table.numel == 20_000 and table.nbytes < 20_000 * 2 + 32768 * 12
    ordered = torch.sort(values, descending=True).values
    for k in [1, 2, 99, 5000, 14_899, 14_900, 14_901, 19_999, 20_000]:
        assert table.kth_largest(k) == ordered[k - 1].item(), k
    with pytest.raises(ValueError, match="k must be in"):
        table.kth_largest(0)


def test_magnitude_ranks_count_the_strictly_smaller_entries() -> None:
    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, 700, generator=g).abs().to(torch.bfloat16).float()  # many ties
    values[1, :50] = 0.0
    ranks = magnitude_ranks(values)
    expected = (values.unsqueeze(1) < values.unsqueeze(2)).sum(2)  # [r, j] = #{m : v[r, m] < v[r, j]}
    assert ranks.dtype == torch.int64 and torch.equal(ranks, expected)
    assert torch.equal(sorted_search_ranks(values), expected)  # the CUDA path, run here on CPU
    assert torch.equal(magnitude_ranks(torch.tensor([[2.0, 1.0, 2.0, 0.5]])), torch.tensor([[2, 1, 2, 0]]))
