"""NuSLERP and the Karcher mean (evomerge.methods.sphere): hand-computed angles, the Karcher condition, and the
engine path on the tiny models equal to the pure function bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import assert_engine_is_function

from evomerge.methods import MethodError, get_method, validate_params
from evomerge.methods.sphere import karcher, karcher_mean, nuslerp, nuslerp_factor
from evomerge.recipe import Recipe

A = math.sqrt(0.5)


def _w(*weights: float) -> torch.Tensor:
    return torch.tensor(weights, dtype=torch.float64)


def test_nuslerp_hand_values() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(nuslerp(None, torch.stack([e1, e2]), weight=_w(1, 1)), torch.tensor([A, A]))
    # unnormalised, t = 3/4 at 90°: sin(π/8) · v0 + sin(3π/8) · v1
    merged = nuslerp(None, torch.stack([2 * e1, 3 * e2]), weight=_w(1, 3))
    torch.testing.assert_close(merged, torch.tensor([2 * math.sin(math.pi / 8), 3 * math.sin(3 * math.pi / 8)]))
    # 60°, t = 1/2: (v0 + v1) / √3
    sixty = torch.tensor([0.5, math.sqrt(3) / 2])
    torch.testing.assert_close(nuslerp(None, torch.stack([e1, sixty]), weight=_w(2, 2)),
                               torch.tensor([math.sqrt(3) / 2, 0.5]))
    # colinear: the linear fallback; weights summing to ~0: t = 1/2
    torch.testing.assert_close(nuslerp(None, torch.stack([e1, 3 * e1]), weight=_w(1, 3)), torch.tensor([2.5, 0.0]))
    torch.testing.assert_close(nuslerp(None, torch.stack([e1, 3 * e1]), weight=_w(1, -1)), torch.tensor([2.0, 0.0]))


def test_nuslerp_whole_tensor_rows_and_columns() -> None:
    v0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    sources, w = torch.stack([v0, v1]), _w(1, 1)
    # flattened: cos = 1/2, θ = π/3 -> (v0 + v1)/√3
    torch.testing.assert_close(nuslerp(None, sources, weight=w), (v0 + v1) / math.sqrt(3))
    # per row: row 0 at 90°, row 1 identical (colinear -> itself)
    rows = nuslerp(None, sources, weight=w, nuslerp_flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[A, A], [1.0, 0.0]]))
    # per column (row_wise): column 0 [1, 1] vs [0, 1] at 45°; column 1 zero vs [1, 0] (norm floored: 90°)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    cols = nuslerp(None, sources, weight=w, nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(cols, torch.tensor([[c, A], [2 * c, 0.0]]))


def test_nuslerp_with_a_base_interpolates_task_vectors() -> None:
    base = torch.tensor([1.0, 1.0])
    sources = base + torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(nuslerp(base, sources, weight=_w(1, 1)), base + torch.tensor([A, A]))
    with pytest.raises(ValueError, match="exactly two models"):
        nuslerp(None, sources[:1], weight=_w(1))


def test_nuslerp_factor_in_double_precision() -> None:
    assert nuslerp_factor(_w(0.3, 0.7)) == 0.7 / (0.3 + 0.7)
    assert nuslerp_factor(_w(0.3, 1e-7 - 0.3)) == 0.5


def test_karcher_symmetric_cases() -> None:
    e = torch.eye(3)
    torch.testing.assert_close(karcher(None, torch.stack([2 * e[0], 4 * e[1]])), torch.tensor([3 * A, 3 * A, 0.0]))
    torch.testing.assert_close(karcher(None, e), torch.full((3,), 1 / math.sqrt(3)))
    # a zero input: left out of the direction, in the scale (its norm 0 counts in the mean norm)
    torch.testing.assert_close(karcher(None, torch.stack([2 * e[0], 0 * e[0]])), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(karcher(None, torch.zeros(2, 3)), torch.zeros(3))
    assert torch.equal(karcher(None, e[:1]), e[0])


def test_karcher_satisfies_the_karcher_condition() -> None:
    g = torch.Generator().manual_seed(3)
    points = torch.rand(3, 6, generator=g) + 0.1 * torch.arange(6.0)
    merged = karcher_mean(list(points), [1 / 3] * 3, max_iter=50, tol=1e-7)
    mu = merged / merged.norm()
    # Σ_i log_μ(u_i) = Σ_i θ_i / sin θ_i · (u_i − cos θ_i μ) vanishes at the Riemannian mean
    units = points / points.norm(dim=1, keepdim=True)
    cos = (units @ mu).clamp(-1, 1)
    theta = torch.arccos(cos)
    tangent = ((theta / torch.sin(theta))[:, None] * (units - cos[:, None] * mu)).sum(0)
    assert tangent.norm() < 1e-5
    torch.testing.assert_close(merged.norm(), points.norm(dim=1).mean())
    one_step = karcher_mean(list(points), [1 / 3] * 3, max_iter=0, tol=1e-7)  # the normalised weighted mean
    torch.testing.assert_close(one_step / one_step.norm(), units.mean(0) / units.mean(0).norm())


def test_engine_path_is_the_function(tiny_llamas: list[str]) -> None:
    base, fts = tiny_llamas[0], tiny_llamas[1:]
    recipe = Recipe(method="nuslerp", sources=[{"model": fts[0], "parameters": {"weight": 0.3}},
                                               {"model": fts[1], "parameters": {"weight": 0.7}}])
    assert assert_engine_is_function(fts[:2], recipe, nuslerp, weight=_w(0.3, 0.7)) > 0
    recipe = Recipe(method="nuslerp", base=base, parameters={"weight": 1.0, "nuslerp_flatten": False},
                    sources=[{"model": f} for f in fts[:2]])
    assert assert_engine_is_function([base, *fts[:2]], recipe, nuslerp, weight=_w(1, 1), nuslerp_flatten=False) > 0
    recipe = Recipe(method="karcher", sources=[{"model": f} for f in fts], parameters={"max_iter": 3})
    assert assert_engine_is_function(fts, recipe, karcher, max_iter=3) > 0


def test_karcher_max_iter_is_a_whole_number() -> None:
    validate_params(get_method("karcher"), {"max_iter": 4.0}, 3, False)
    with pytest.raises(MethodError, match="max_iter must be a whole number"):
        validate_params(get_method("karcher"), {"max_iter": 2.5}, 3, False)
