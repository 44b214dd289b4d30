"""NearSwap and Arcee Fusion (evomerge.methods.pairwise): hand-computed values, an independent numpy formula, and
the engine path on the tiny models equal to the pure function bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import assert_engine_is_function

from evomerge.methods import MethodError, get_method, validate_params
from evomerge.methods.pairwise import arcee_fusion, fusion_threshold, nearswap
from evomerge.recipe import Recipe


def test_nearswap_hand_values() -> None:
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.005, 0.1, -0.02, 1.0])
    # |a − b| = .005, .1, .02, 0 (floored at 1e-6) -> weights t/|a − b| = 2 -> 1, .1, .5, 1e4 -> 1
    merged = nearswap(a, b[None], t=0.01)
    torch.testing.assert_close(merged, torch.tensor([0.005, 0.01, -0.01, 1.0]), rtol=0, atol=1e-8)
    assert torch.equal(nearswap(a, b[None], t=0.0), a)  # t = 0 keeps the base
    assert torch.equal(nearswap(a, b[None], t=1.0), b)  # every entry within t: the other model


def test_nearswap_needs_a_base_and_one_other_model() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one other model"):
        nearswap(None, x[:1], t=0.1)
    with pytest.raises(ValueError, match="exactly one other model"):
        nearswap(x[0], x, t=0.1)
    with pytest.raises(MethodError, match="exactly 1 sources, got 2"):
        validate_params(get_method("nearswap"), {"t": 0.1}, 2, True)
    with pytest.raises(MethodError, match="missing required parameter"):
        validate_params(get_method("nearswap"), {}, 1, True)


def test_arcee_fusion_takes_only_the_outlier_change() -> None:
    a = torch.zeros(8)
    b = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0])
    # one KL for the vector, so importance ∝ |b − a|; sorted indices floor(q · 7) = 1, 3, 5 -> .2, .4, .6 (× KL):
    # fence = (.4 + 1.5 · .4) · KL = KL; only 5 · KL reaches it
    merged = arcee_fusion(a, b[None])
    assert torch.equal(merged, torch.tensor([0.0] * 7 + [5.0]))


def _numpy_fusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    importance = np.abs(b - a) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    ordered = np.sort(importance.ravel())
    q1, med, q3 = (ordered[int(np.float32(f) * np.float32(ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    return np.where(importance >= med + 1.5 * (q3 - q1), b, a)


def test_arcee_fusion_matches_a_numpy_formula_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 40, generator=g)
    b = a + 0.3 * torch.randn(16, 40, generator=g) * (torch.rand(16, 1, generator=g) > 0.5)
    merged = arcee_fusion(a, b[None])
    expected = torch.from_numpy(_numpy_fusion(a.double().numpy(), b.double().numpy())).float()
    changed = b != a  # half of the rows
    taken, wanted = (merged == b)[changed], (expected == b)[changed]
    assert 0 < taken.float().mean() < 0.5  # some changes pass the fence, most do not
    assert (taken == wanted).float().mean() > 0.99  # float64 vs float32 only moves entries at the fence
    agree = (merged == b) == (expected == b)
    torch.testing.assert_close(merged[agree], expected[agree])
    assert torch.equal(merged[~(merged == b)], a[~(merged == b)])  # what is not taken is the base


def test_fusion_threshold_picks_floor_indices() -> None:
    scores = torch.arange(11.0)  # n − 1 = 10: indices 2, 5, 7 -> median 5 + 1.5 · (7 − 2)
    assert fusion_threshold(scores).item() == 12.5
    # past mergekit's 10⁶-entry sample: still every entry (exact quantiles 3·10⁵, 6·10⁵, 9·10⁵), in any order
    big = torch.randperm(1_200_001, generator=torch.Generator().manual_seed(0)).float()
    assert fusion_threshold(big).item() == 600_000 + 1.5 * 600_000


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_nearswap_entrywise_engine_path_is_the_function(tiny_llamas: list[str], compiled: bool) -> None:
    """Runs of tensors in chunks of 64 entries (eager) or one torch.compile kernel: the pure function's bits."""
    base, ft = tiny_llamas[:2]
    recipe = Recipe(method="nearswap", base=base, sources=[{"model": ft}], parameters={"t": 0.02})
    options = {"compile": compiled, "chunk_entries": 64}
    assert assert_engine_is_function([base, ft], recipe, nearswap, engine_options=options, t=0.02) > 0


def test_arcee_fusion_engine_path_is_the_function(tiny_llamas: list[str]) -> None:
    base, ft = tiny_llamas[:2]
    recipe = Recipe(method="arcee_fusion", base=base, sources=[{"model": ft}])
    assert assert_engine_is_function([base, ft], recipe, arcee_fusion) > 0
