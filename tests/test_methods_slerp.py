"""SLERP and multi-model SLERP against hand-computed values and the Karcher-mean optimality condition."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.methods.slerp import multislerp, slerp

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


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_multislerp_of_two_is_slerp(t: float) -> None:
    g = torch.Generator().manual_seed(1)
    base, sources = torch.randn(5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    sources[1] *= 3.0  # unequal norms: coefficients are applied to the unnormalised vectors in both
    weight = W([1 - t, t])
    assert torch.allclose(multislerp(None, sources, weight=weight), slerp(None, sources, t=t), atol=1e-5)
    with_base = base + slerp(None, sources - base, t=t)  # with a base: slerp of the task vectors
    assert torch.allclose(multislerp(base, sources, weight=weight), with_base, atol=1e-5)


def test_multislerp_orthonormal_equal_weights_is_the_symmetric_direction() -> None:
    out = multislerp(None, torch.eye(3), weight=W([2.0, 2.0, 2.0]))  # weights are normalised
    assert torch.allclose(out, torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)


def test_multislerp_satisfies_the_weighted_karcher_condition() -> None:
    g = torch.Generator().manual_seed(2)
    units = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64, generator=g) + 2.0, dim=1)
    weight = W([0.1, 0.4, 0.2, 0.3])
    m = multislerp(None, units.float(), weight=weight).double()
    assert abs(m.norm().item() - 1.0) < 1e-5  # equal norms stay on the sphere
    # Riemannian gradient of sum w_i theta_i^2 at m: sum w_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) = 0
    cos = (units @ m).clamp(-1, 1)
    theta = torch.arccos(cos)
    logs = (theta / torch.sin(theta)).unsqueeze(1) * (units - cos.unsqueeze(1) * m)
    assert (weight.double().unsqueeze(1) * logs).sum(0).norm().item() < 1e-5


def test_multislerp_colinear_falls_back_to_weighted_mean() -> None:
    sources = W([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    assert torch.allclose(multislerp(None, sources, weight=W([1.0, 1.0, 2.0])), W([2.25, 4.5]))


def test_multislerp_single_source_and_bad_weights() -> None:
    source = W([[0.3, -2.0]])
    assert torch.allclose(multislerp(None, source, weight=W([0.5])), source[0])
    with pytest.raises(ValueError, match="positive sum"):
        multislerp(None, torch.ones(2, 2), weight=W([0.0, 0.0]))


def test_slerp_zero_norm_is_a_right_angle_like_mergekit() -> None:
    # mergekit replaces a norm <= 1e-8 by 1: the zero vector has cos 0 with anything, Ω = π/2 (was: linear fallback)
    out = slerp(None, torch.stack([W([0.0, 0.0]), W([2.0, 4.0])]), t=0.25)
    torch.testing.assert_close(out, math.sin(0.25 * math.pi / 2) * W([2.0, 4.0]), rtol=1e-6, atol=0)


def test_slerp_just_below_the_colinear_threshold_interpolates_on_the_sphere() -> None:
    a, b = W([1.0, 0.0]), W([1.0, 0.035])  # cos = 0.99939 < 0.9995
    omega = math.acos(1 / math.hypot(1.0, 0.035))
    expected = math.sin(0.5 * omega) / math.sin(omega) * (a + b)
    torch.testing.assert_close(slerp(None, torch.stack([a, b]), t=0.5), expected, rtol=1e-5, atol=0)
