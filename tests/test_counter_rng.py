"""The counter-based generator of DARE/DELLA against an independent uint32 implementation (numpy), and its
statistical and structural properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.methods.counter_rng import row_keys, uniform, uniform_like


def _reference(k1: int, k2: int, index: np.ndarray) -> np.ndarray:
    """The module docstring's formula on numpy uint32 words (well-defined wrap-around, logical shifts)."""

    def mix(x: np.ndarray) -> np.ndarray:
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    with np.errstate(over="ignore"):
        x = (index % (1 << 32)).astype(np.uint32) * np.uint32(0x9E3779B9) + np.uint32(k1)
        y = mix(mix(x) ^ np.uint32(k2))
    return (y >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _splitmix64(state: int) -> int:
    mask = (1 << 64) - 1
    z = (state + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_known_value() -> None:
    # first output of SplitMix64 seeded with 0 (Vigna's reference implementation): 0xE220A8397B1DCDAF
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    keys = row_keys(0, 1)
    assert int(keys[0, 0]) & 0xFFFFFFFF == 0x7B1DCDAF and int(keys[0, 1]) & 0xFFFFFFFF == 0xE220A839


@pytest.mark.parametrize("seed", [0, 7, (1 << 63) - 1])
def test_uniform_equals_the_uint32_reference(seed: int) -> None:
    keys = row_keys(seed, 3)
    index = np.concatenate([np.arange(0, 70_000), np.arange((1 << 31) - 50, (1 << 31) + 50), [(1 << 32) + 3]])
    got = uniform(keys, torch.from_numpy(index))
    for i in range(3):
        k1, k2 = (int(k) & 0xFFFFFFFF for k in keys[i])
        assert np.array_equal(got[i].numpy(), _reference(k1, k2, index)), i
    # the counter is taken modulo 2^32: index 2^32 + 3 draws what index 3 draws
    assert torch.equal(got[:, -1], got[:, 3])


def test_uniform_range_and_moments() -> None:
    u = uniform(row_keys(11, 2), torch.arange(1 << 20))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 2e-3
    assert abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.histc(u[0], bins=64, min=0, max=1)  # chi-square over 64 equal bins
    expected = u.shape[1] / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: the 99.99% quantile is about 115


def test_rows_seeds_and_neighbours_are_uncorrelated() -> None:
    n = 1 << 18
    index = torch.arange(n)
    a, b = uniform(row_keys(3, 2), index)
    c = uniform(row_keys(4, 1), index)[0]
    for x, y in [(a, b), (a, c), (a[:-1], a[1:])]:  # rows of one tensor, two seeds, consecutive entries
        corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        assert abs(corr) < 0.01
    # keep decisions of two rows at d = 0.5 agree about half of the time, as independent coins do
    assert abs(((a < 0.5) == (b < 0.5)).float().mean().item() - 0.5) < 0.01


def test_uniform_like_is_chunk_invariant_and_reproducible() -> None:
    tau = torch.zeros(3, 40, 25)
    u = uniform_like(tau, 99)
    assert torch.equal(u, uniform_like(tau, 99))
    assert not torch.equal(u, uniform_like(tau, 100))
    keys = row_keys(99, 3)
    chunk = uniform(keys, torch.arange(320, 700))
    assert torch.equal(chunk, u.view(3, -1)[:, 320:700])
