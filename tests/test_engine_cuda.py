"""CUDA path of the merge core: the same recipe on CUDA and CPU gives the same weights (within fp32 rounding).

Run on a GPU machine: ``python -m pytest -m gpu tests/test_engine_cuda.py``.
DARE/DELLA draw their masks from the counter-based generator (evomerge.methods.counter_rng), the same on both
devices, so they are compared with CPU like the deterministic methods.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_family

from evomerge.engine import MergeEngine
from evomerge.methods import get_method
from evomerge.recipe import Recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

METHODS = {
    "linear": {}, "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.4},
    "breadcrumbs": {"density": 0.5, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05}, "model_stock": {}, "multislerp": {},
    "dare_linear": {"density": 0.4}, "dare_ties": {"density": 0.4}, "della": {"density": 0.4, "epsilon": 0.1},
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("cuda"), n=3, num_layers=3)
    return str(base), [str(f) for f in fts]


@pytest.fixture(scope="module")
def engines(family):
    base, fts = family
    return {d: MergeEngine([base, *fts], device=d) for d in ("cpu", "cuda")}


def recipe(method: str, params: dict, family, seed: int = 0) -> Recipe:
    base, fts = family
    weighted = any(p.name == "weight" for p in get_method(method).params)
    return Recipe(method=method, base=base, seed=seed, parameters=params, sources=[
        {"model": p, "parameters": {"weight": w} if weighted else {}} for p, w in zip(fts, [1.0, 0.6, 0.3])])


def live(engine: MergeEngine) -> dict[str, torch.Tensor]:
    return {n: t.detach().float().cpu() for n, t in engine.model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_matches_cpu(engines, family, method):
    r = recipe(method, METHODS[method], family, seed=5)
    engines["cpu"].materialize(r)
    engines["cuda"].materialize(r)
    cpu, cuda = live(engines["cpu"]), live(engines["cuda"])
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")


def test_slerp_cuda_matches_cpu(engines, family):
    base, fts = family
    r = Recipe(method="slerp", sources=[{"model": fts[0]}, {"model": fts[1]}], parameters={"t": [0.2, 0.8]})
    engines["cpu"].materialize(r)
    engines["cuda"].materialize(r)
    cpu, cuda = live(engines["cpu"]), live(engines["cuda"])
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-5, atol=1e-6)


def test_bf16_cuda_matches_cpu(family):
    base, fts = family
    cpu, cuda = (MergeEngine([base, *fts], device=d, dtype="bfloat16") for d in ("cpu", "cuda"))
    r = recipe("ties", {"density": 0.5}, family)
    cpu.materialize(r)
    cuda.materialize(r)
    for name, t in live(cpu).items():
        torch.testing.assert_close(live(cuda)[name], t, rtol=1.6e-2, atol=1e-3)  # one bf16 ulp


# --- the compiled CUDA hot path against the plain formula -------------------------------------------------------
FUSED = {"linear": {}, "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.4},
         "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1}, "dare_linear": {"density": 0.6},
         "dare_ties": {"density": 0.6},
         "della": {"density": 0.5, "epsilon": 0.2}}


def plain(engine: MergeEngine, r: Recipe, name: str, device: str) -> torch.Tensor:
    """The method's pure function on the whole fp32 tensor on ``device`` (with the tensor's seed)."""
    from evomerge.engine import tensor_seed

    method = get_method(r.method)
    base, sources = engine.indices(r)
    stack = engine.sources.stack(name).to(device, torch.float32)
    kwargs = {p.key: r.parameters.get(p.name, p.default) for p in method.params if not p.per_source}
    for p in method.params:
        if p.per_source:
            values = [s.parameters.get(p.name, r.parameters.get(p.name, p.default)) for s in r.sources]
            kwargs[p.key] = torch.tensor(values, dtype=torch.float32)
    return method.fn(None if base is None else stack[base], stack[sources], seed=tensor_seed(r.seed, name), **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(FUSED))
def test_compiled_cuda_merge_is_bit_identical_to_the_plain_formula(family, method, dtype, monkeypatch):
    """Equal to the formula on CPU (IEEE ops, no FMA contraction, IEEE division; DARE's draws are integer
    arithmetic, the same on both devices)."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")  # the tiny family is below the size where compiling is automatic
    engine = MergeEngine([family[0], *family[1]], device="cuda", dtype=dtype)
    r = recipe(method, FUSED[method], family, seed=3)
    if method == "linear":
        r = r.model_copy(update={"base": None})
    engine.materialize(r)
    assert engine.kernels.is_compiled(method), "torch.compile fell back to eager"
    live_model = live(engine)
    for name in engine.names:
        expected = plain(engine, r, name, "cpu").to(getattr(torch, dtype)).float().cpu()
        got = live_model[name]
        assert torch.equal(got, expected), f"{method} {name}: max diff {(got - expected).abs().max()}"
