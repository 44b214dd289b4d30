"""SLERP and multi-SLERP against hand-computed values and mergekit's multislerp algorithm written out step by step."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.methods.slerp import slerp
from evomerge.methods.sphere import multislerp

W = torch.tensor
R2 = math.sqrt(2.0) / 2


def test_slerp_orthogonal_unit_and_unnormalised_vectors() -> None:
    assert torch.allclose(slerp(None, W([[1.0, 0.0], [0.0, 1.0]]), t=0.5), W([R2, R2]))
    # Omega = pi/2; t = 1/3: sin(pi/3) a + sin(pi/6) b on the raw vectors a = [2, 0], b = [0, 1]
    out = slerp(None, W([[2.0, 0.0], [0.0, 1.0]]), t=1 / 3)
    assert torch.allclose(out, W([2 * math.sqrt(3) / 2, 0.5]))


def test_slerp_60_degrees_hand_value() -> None:
    a, b = W([1.0, 0.0]), W([0.5, math.sqrt(3) / 2])  # Omega = pi/3; t = 0.5 -> the 30 degree direction
    assert torch.allclose(slerp(None, torch.stack([a, b]), t=0.5), W([math.sqrt(3) / 2, 0.5]))


def test_slerp_endpoints_and_base_unused() -> None:
    g = torch.Generator().manual_seed(0)
    sources = torch.randn(2, 4, 3, generator=g)
    assert torch.allclose(slerp(None, sources, t=0.0), sources[0], atol=1e-6)
    assert torch.allclose(slerp(torch.ones(4, 3), sources, t=1.0), sources[1], atol=1e-6)


@pytest.mark.parametrize(
    "a,b",
    [
        (W([1.0, 2.0]), W([2.0, 4.0])),  # parallel
        (W([1.0, 2.0]), W([-3.0, -6.0])),  # anti-parallel
        (W([1.0, 1.0]), W([1.0, 1.02])),  # cos = 0.99990 > mergekit's 0.9995 (norm-weight-like)
    ],
)
def test_slerp_degenerate_falls_back_to_linear(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(slerp(None, torch.stack([a, b]), t=0.25), 0.75 * a + 0.25 * b)


def test_slerp_needs_exactly_two_sources() -> None:
    with pytest.raises(ValueError, match="exactly 2 sources, got 3"):
        slerp(None, torch.ones(3, 2), t=0.5)


def _mergekit_multislerp(base: torch.Tensor | None, sources: torch.Tensor, weight: list[float],
                         normalize: bool = True) -> torch.Tensor:
    """mergekit 0.1.5's multislerp, step by step in float64 (tangent step and exponential map included)."""
    eps = 1e-8
    x = (sources if base is None else sources - base).double().flatten(1)
    w = torch.tensor(weight, dtype=torch.float64) / (sum(weight) if normalize else 1.0)
    norms = x.norm(dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units * mean).sum(1, keepdim=True) * mean) * w[:, None]).sum(0)
    length = tangent.norm() + eps
    out = (mean * torch.cos(length) + tangent * torch.sin(length) / length) * (norms[:, 0] * w).sum()
    out = out.view(sources.shape[1:])
    return out if base is None else out + base.double()


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_is_mergekits_algorithm(with_base: bool) -> None:
    g = torch.Generator().manual_seed(1)
    base, sources = torch.randn(5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    sources[1] *= 3.0  # unequal norms
    weight = [0.2, 0.5, 0.9]
    out = multislerp(base if with_base else None, sources, weight=W(weight))
    expected = _mergekit_multislerp(base if with_base else None, sources, weight)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    # the weights as given: the same direction, at the unnormalised weighted norm (here 1.6 times the mean norm)
    unnormalized = multislerp(base if with_base else None, sources, weight=W(weight), normalize_weights=False)
    expected = _mergekit_multislerp(base if with_base else None, sources, weight, normalize=False)
    torch.testing.assert_close(unnormalized.double(), expected, rtol=1e-6, atol=1e-6)


def test_multislerp_of_two_is_the_renormalised_mean_not_slerp() -> None:
    # u1 = (1, 0), u2 = (0, 1), w = (3/4, 1/4): M = (3/4, 1/4), m = (3, 1)/sqrt(10), mean norm 1
    out = multislerp(None, W([[1.0, 0.0], [0.0, 1.0]]), weight=W([0.75, 0.25]))
    torch.testing.assert_close(out, W([3 / math.sqrt(10), 1 / math.sqrt(10)]))
    assert not torch.allclose(out, slerp(None, W([[1.0, 0.0], [0.0, 1.0]]), t=0.25), atol=1e-3)  # (cos, sin)(pi/8)
    # unequal norms: the direction of the unit vectors' mean, at the weighted mean norm 0.5 * 2 + 0.5 * 4 = 3
    out = multislerp(None, W([[2.0, 0.0], [0.0, 4.0]]), weight=W([1.0, 1.0]))
    torch.testing.assert_close(out, W([3 * R2, 3 * R2]))
    # normalize_weights: false: the same direction at the summed norm 2 + 4
    out = multislerp(None, W([[2.0, 0.0], [0.0, 4.0]]), weight=W([1.0, 1.0]), normalize_weights=False)
    torch.testing.assert_close(out, W([6 * R2, 6 * R2]))


def test_multislerp_eps_is_added_to_the_norms_and_bounds_the_mean() -> None:
    # eps = 1: u = (1/2, 0), (0, 1/2), M = (1/4, 1/4), |M| = 0.354 < eps: two sources interpolate linearly
    sources = W([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(multislerp(None, sources, weight=W([0.5, 0.5]), eps=1.0), W([0.5, 0.5]))
    torch.testing.assert_close(multislerp(None, sources, weight=W([0.5, 0.5])), W([R2, R2]))


def test_multislerp_orthonormal_equal_weights_is_the_symmetric_direction() -> None:
    out = multislerp(None, torch.eye(3), weight=W([2.0, 2.0, 2.0]))  # weights are normalised
    assert torch.allclose(out, torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)


def test_multislerp_zero_task_vector_and_cancelling_directions() -> None:
    base = W([1.0, 1.0])
    # a source equal to the base adds no direction and norm 0: 0.5 * (0.6, 0.8) normalised, at norm 0.5 * 5
    out = multislerp(base, torch.stack([base, base + W([3.0, 4.0])]), weight=W([1.0, 1.0]))
    torch.testing.assert_close(out, base + W([1.5, 2.0]))
    # antipodal directions with balancing weights: two sources interpolate linearly, three are refused (mergekit)
    torch.testing.assert_close(multislerp(None, W([[1.0, 0.0], [-1.0, 0.0]]), weight=W([1.0, 1.0])), W([0.0, 0.0]))
    with pytest.raises(ValueError, match="directions is zero"):
        multislerp(None, W([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]), weight=W([1.0, 1.0, 1.0]))


def test_multislerp_colinear_falls_back_to_weighted_mean() -> None:
    sources = W([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    assert torch.allclose(multislerp(None, sources, weight=W([1.0, 1.0, 2.0])), W([2.25, 4.5]))


def test_multislerp_single_source_and_bad_weights() -> None:
    source = W([[0.3, -2.0]])
    assert torch.allclose(multislerp(None, source, weight=W([0.5])), source[0])
    with pytest.raises(ValueError, match="sum to 0.*normalize_weights: false"):
        multislerp(None, torch.ones(2, 2), weight=W([1.0, -1.0]))
    # a negative sum is normalised away, as mergekit divides by it: (-1, -3) weighs like (1/4, 3/4)
    torch.testing.assert_close(multislerp(None, sources := W([[1.0, 0.0], [0.0, 1.0]]), weight=W([-1.0, -3.0])),
                               multislerp(None, sources, weight=W([0.25, 0.75])))


def test_slerp_zero_norm_is_a_right_angle_like_mergekit() -> None:
    # mergekit replaces a norm <= 1e-8 by 1: the zero vector has cos 0 with anything, Ω = π/2 (was: linear fallback)
    out = slerp(None, torch.stack([W([0.0, 0.0]), W([2.0, 4.0])]), t=0.25)
    torch.testing.assert_close(out, math.sin(0.25 * math.pi / 2) * W([2.0, 4.0]), rtol=1e-6, atol=0)


def test_slerp_just_below_the_colinear_threshold_interpolates_on_the_sphere() -> None:
    a, b = W([1.0, 0.0]), W([1.0, 0.035])  # cos = 0.99939 < 0.9995
    omega = math.acos(1 / math.hypot(1.0, 0.035))
    expected = math.sin(0.5 * omega) / math.sin(omega) * (a + b)
    torch.testing.assert_close(slerp(None, torch.stack([a, b]), t=0.5), expected, rtol=1e-5, atol=0)
