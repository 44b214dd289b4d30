"""TIES, DARE, breadcrumbs and DELLA: hand-computed values, invariants and the randomness contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from evomerge.methods.counter_rng import uniform_like
from evomerge.methods.linear import task_arithmetic
from evomerge.methods.sparsify import (
    disjoint_merge,
    magnitude_band_prune,
    random_prune,
    rank_keep_probability,
)
from evomerge.methods.ties import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    ties,
)

W = torch.tensor
BASE = W([0.5, 0.5, 0.5, 0.5])
TAU = W([[3.0, -1.0, 0.5, -2.0], [-1.0, 2.0, 1.0, -4.0]])
SOURCES = BASE + TAU


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_case(seed: int = 0, n: int = 3, shape: tuple[int, ...] = (6, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(seed)
    return torch.randn(shape, generator=g), torch.randn(n, *shape, generator=g)


def test_ties_hand_values() -> None:
    # density 0.75 -> k = 3 per source: tau1 -> [3, -1, 0, -2], tau2 -> [0, 2, 1, -4]
    # elected signs of the sum [3, 1, 1, -6]: + + + -; tau1's -1 at entry 1 disagrees and is dropped
    # disjoint mean: [3/1, 2/1, 1/1, (-2 - 4)/2]
    out = ties(BASE, SOURCES, weight=W([1.0, 1.0]), density=W([0.75, 0.75]))
    assert torch.allclose(out, BASE + W([3.0, 2.0, 1.0, -3.0]))
    # weights (2, 1): contributions [6, -2, 0, -4] and [0, 2, 1, -4]; sum [6, 0, 1, -8] -> signs + + + -
    # entry 1's sum is exactly 0: + is elected (mergekit's rule), so source 2's 2 (weight 1) stands alone: 2 / 1;
    # entry 3: (-4 - 4) / (2 + 1)
    out = ties(BASE, SOURCES, weight=W([2.0, 1.0]), density=W([0.75, 0.75]), lam=0.5)
    assert torch.allclose(out, BASE + 0.5 * W([6.0 / 2, 2.0 / 1, 1.0, -8.0 / 3]))
    # normalize=False: plain sum of the agreeing contributions
    out = ties(BASE, SOURCES, weight=W([1.0, 1.0]), density=W([0.75, 0.75]), normalize=False)
    assert torch.allclose(out, BASE + W([3.0, 2.0, 1.0, -6.0]))


def test_ties_per_source_density() -> None:
    # source 1 keeps k = 1 ([3, 0, 0, 0]), source 2 keeps all; sum [2, 2, 1, -4]
    out = ties(BASE, SOURCES, weight=W([1.0, 1.0]), density=W([0.25, 1.0]))
    assert torch.allclose(out, BASE + W([3.0, 2.0, 1.0, -4.0]))


def test_ties_full_density_with_agreeing_signs_is_task_arithmetic() -> None:
    base, sources = _random_case()
    sources = base + (sources - base).abs()  # all task vectors positive: signs agree everywhere
    weight = W([0.2, 0.5, 0.3])
    expected = task_arithmetic(base, sources, weight=weight, lam=1.3, normalize=True)
    out = ties(base, sources, weight=weight, density=W([1.0, 1.0, 1.0]), lam=1.3)
    assert torch.allclose(out, expected, atol=1e-6)


def test_ties_invariants_one_source_and_lambda_zero() -> None:
    base, sources = _random_case()
    assert torch.allclose(ties(base, sources[:1], weight=W([1.0]), density=W([1.0])), sources[0], atol=1e-6)
    assert torch.equal(ties(base, sources, weight=torch.ones(3), density=torch.full((3,), 0.5), lam=0.0), base)


def test_disjoint_merge_empty_entry_is_zero_and_a_zero_sum_elects_plus() -> None:
    tau = W([[0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])  # entry 0 empty; entries 1, 2 sum to exactly 0: + is elected
    assert torch.equal(disjoint_merge(tau, W([1.0, 1.0]), normalize=True), W([0.0, 1.0, 1.0]))
    assert torch.equal(disjoint_merge(tau, W([1.0, 1.0]), normalize=False), W([0.0, 1.0, 1.0]))


def test_breadcrumbs_mask_hand_values() -> None:
    tau = W([[5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0]])
    # gamma 0.1 -> drop the top round(1) = |5|; keep down to rank round((0.1 + 0.5) * 10) = 6
    out = magnitude_band_prune(tau, W([0.5]), W([0.1]))
    assert torch.equal(out, W([[0.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]]))
    # gamma 0: no outliers dropped, plain top-k
    out = magnitude_band_prune(tau, W([0.3]), W([0.0]))
    assert torch.equal(out, W([[5.0, -4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))


def test_breadcrumbs_and_breadcrumbs_ties_hand_values() -> None:
    # gamma 0.25 drops the top 1 of 4, density 0.5 keeps the next 2 (down to rank 3):
    # tau1 [3, -1, 0.5, -2]: 3 dropped, -2 and -1 kept -> [0, -1, 0, -2]
    # tau2 [-1, 2, 1, -4]: -4 dropped, 2 kept, then |-1| and |1| tie at rank 3: both kept -> [-1, 2, 1, 0]
    kwargs = dict(weight=W([1.0, 1.0]), density=W([0.5, 0.5]), gamma=W([0.25, 0.25]))
    assert torch.allclose(breadcrumbs(BASE, SOURCES, **kwargs), BASE + W([-1.0, 1.0, 1.0, -2.0]))
    # with election: sum [-1, 1, 1, -2] -> signs - + + -; entry 1: tau1 -1 disagrees -> 2 / 1
    assert torch.allclose(breadcrumbs_ties(BASE, SOURCES, **kwargs), BASE + W([-1.0, 2.0, 1.0, -2.0]))


def test_dare_follows_the_draw_contract() -> None:
    base, sources = _random_case(1)
    tau = sources - base
    density, weight = W([0.3, 0.6, 0.9]), W([1.0, 0.5, 2.0])
    u = uniform_like(tau, 7)  # the documented draw: keep iff u < d
    kept = torch.where(u < density.view(-1, 1, 1), tau / density.view(-1, 1, 1), 0.0)
    expected = base + 0.8 * (weight.view(-1, 1, 1) * kept).sum(0)
    out = dare_linear(base, sources, weight=weight, density=density, lam=0.8, seed=7)
    assert torch.allclose(out, expected, atol=1e-6)
    unscaled = base + 0.8 * (weight.view(-1, 1, 1) * torch.where(u < density.view(-1, 1, 1), tau, 0.0)).sum(0)
    out = dare_linear(
        base, sources, weight=weight, density=density, lam=0.8, rescale=False, seed=7
    )
    assert torch.allclose(out, unscaled, atol=1e-6)


def test_dare_same_seed_same_mask_different_seed_different_mask() -> None:
    tau = torch.randn(2, 50, 40, generator=_generator(0))
    density = W([0.5, 0.5])
    first = random_prune(tau, density, rescale=True, seed=3)
    again = random_prune(tau, density, rescale=True, seed=3)
    other = random_prune(tau, density, rescale=True, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first != 0, other != 0)


def test_dare_keep_rate_and_unbiased_rescale() -> None:
    tau = torch.ones(1, 200_000)
    out = random_prune(tau, W([0.3]), rescale=True, seed=0)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.02


def test_dare_density_one_is_task_arithmetic_and_zero_is_base() -> None:
    base, sources = _random_case(2)
    weight = W([0.5, 1.0, -0.5])
    expected = task_arithmetic(base, sources, weight=weight, lam=1.5)
    out = dare_linear(base, sources, weight=weight, density=torch.ones(3), lam=1.5, seed=0)
    assert torch.allclose(out, expected, atol=1e-5)
    out = dare_ties(base, sources, weight=torch.ones(3), density=torch.zeros(3), seed=0)
    assert torch.equal(out, base)


def test_dare_ties_full_density_equals_ties_full_density() -> None:
    base, sources = _random_case(3)
    kwargs = dict(weight=W([1.0, 2.0, 0.5]), density=torch.ones(3), lam=0.7, normalize=True)  # dare_ties: False
    assert torch.allclose(dare_ties(base, sources, seed=0, **kwargs), ties(base, sources, **kwargs))


def test_random_methods_require_a_seed() -> None:
    base, sources = _random_case()
    with pytest.raises(ValueError, match="needs a seed"):
        dare_ties(base, sources, weight=torch.ones(3), density=torch.ones(3))


def test_della_keep_probability_hand_values_and_ties() -> None:
    tau = W([[0.1, -0.4, 0.3, -0.2]])  # ranks 0, 3, 2, 1 -> p = 0.3 + 0.4 * r / 3
    p = rank_keep_probability(tau, W([0.5]), W([0.2]))
    assert torch.allclose(p, W([[0.3, 0.7, 0.3 + 0.8 / 3, 0.3 + 0.4 / 3]]))
    assert torch.allclose(p.mean(), W(0.5))
    tied = rank_keep_probability(W([[1.0, -1.0, 2.0]]), W([0.5]), W([0.5]))  # ranks 0, 0, 2
    assert torch.allclose(tied, W([[0.0, 0.0, 1.0]]))
    assert torch.allclose(rank_keep_probability(W([[7.0]]), W([0.4]), W([0.1])), W([[0.4]]))


def test_della_follows_the_draw_contract() -> None:
    base = torch.zeros(4)
    sources = W([[0.1, -0.4, 0.3, -0.2]])
    p = W([0.3, 0.7, 0.3 + 0.8 / 3, 0.3 + 0.4 / 3])
    u = uniform_like(sources - base, 5)
    expected = torch.where(u[0] < p, sources[0] / p, 0.0)
    out = della_linear(base, sources, weight=W([1.0]), density=W([0.5]), epsilon=W([0.2]), seed=5)
    assert torch.allclose(out, expected)


def test_della_zero_probability_entries_never_produce_nan() -> None:
    base, sources = _random_case(4)
    out = della(base, sources, weight=torch.ones(3), density=torch.full((3,), 0.2), epsilon=torch.full((3,), 0.2),
                seed=0)
    assert torch.isfinite(out).all()


def test_della_without_spread_is_dare() -> None:
    base, sources = _random_case(5)
    kwargs = dict(weight=W([1.0, 0.5, 2.0]), density=W([0.4, 0.6, 0.8]), lam=1.1)
    della_out = della(base, sources, epsilon=torch.zeros(3), seed=9, **kwargs)
    # della divides by the agreeing weights by default (mergekit's della default_normalize), dare_ties does not
    assert torch.allclose(della_out, dare_ties(base, sources, seed=9, normalize=True, **kwargs), atol=1e-6)
    linear_out = della_linear(base, sources, epsilon=torch.zeros(3), seed=9, **kwargs)
    assert torch.allclose(linear_out, dare_linear(base, sources, seed=9, **kwargs), atol=1e-6)


@pytest.mark.parametrize("method", [ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear])
def test_task_vector_methods_need_base_and_keep_inputs(method: Callable[..., torch.Tensor]) -> None:
    base, sources = _random_case(6)
    before = (base.clone(), sources.clone())
    kwargs = dict(weight=torch.ones(3), density=torch.full((3,), 0.5))
    if method.sparsify in (dare_ties.sparsify, della.sparsify):
        kwargs["seed"] = 0
    if method in (breadcrumbs, breadcrumbs_ties):
        kwargs["gamma"] = torch.full((3,), 0.1)
    if method in (della, della_linear):
        kwargs["epsilon"] = torch.full((3,), 0.1)
    out = method(base, sources, **kwargs)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.equal(base, before[0]) and torch.equal(sources, before[1])
    with pytest.raises(ValueError, match="need a base model"):
        method(None, sources, **kwargs)
