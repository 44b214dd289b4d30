"""CUDA checks of the merge methods: exact thresholds on the device, CPU/CUDA agreement (DARE draws included)."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import METHODS, magnitude_threshold
from evomerge.methods.counter_rng import row_keys, uniform
from evomerge.methods.sparsify import random_prune

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("n", [1, 5, 1000, 65_537, 3_000_000])
def test_cuda_threshold_equals_topk(n: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(n)
    values = torch.randn(n, device="cuda", generator=g).abs()
    values[: n // 3] = values[: n // 3].to(torch.bfloat16).float()  # duplicates
    for k in {1, n, max(1, n // 3), max(1, n // 10)}:
        assert torch.equal(magnitude_threshold(values, k), torch.topk(values, k).values[-1]), k


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_agree_between_cpu_and_cuda(name: str) -> None:
    method = METHODS[name]
    g = torch.Generator().manual_seed(0)
    n = 2 if method.max_sources == 2 else 3
    base, sources = torch.randn(64, 48, generator=g), torch.randn(n, 64, 48, generator=g)
    stats = {"fisher": torch.rand(n, 64, 48, generator=g), "gram": None, None: None}[method.statistic]
    if method.statistic == "gram":
        x = torch.randn(n, 200, 48, generator=g)
        stats = x.transpose(1, 2) @ x
    kwargs = {}
    for p in method.params:
        value = 0.5 if p.default is None else p.default
        kwargs[p.key] = torch.full((n,), float(0.3 if p.name == "density" else value)) if p.per_source else value

    def run(device: str) -> torch.Tensor:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        b = base.to(device) if method.needs_base else None
        extra = method.whole_tensor_inputs(7, None if stats is None else stats.to(device))
        return method.fn(b, sources.to(device), **extra, **moved)

    assert torch.allclose(run("cuda").cpu(), run("cpu"), atol=1e-4, rtol=1e-4)


def test_counter_draws_are_identical_on_cuda_and_cpu() -> None:
    keys = row_keys(123, 3)
    index = torch.arange(2**31 - 5_000_000, 2**31 + 5_000_000, dtype=torch.int64)  # across the int32 wrap
    assert torch.equal(uniform(keys.cuda(), index.cuda()).cpu(), uniform(keys, index))


def test_cuda_dare_keep_rate() -> None:
    tau = torch.ones(2, 1_000_000, device="cuda")
    density = torch.tensor([0.2, 0.7], device="cuda")
    first = random_prune(tau, density, rescale=True, seed=1)
    assert torch.equal(first.cpu(), random_prune(tau.cpu(), density.cpu(), rescale=True, seed=1))
    rates = (first != 0).float().mean(1).cpu()
    assert torch.allclose(rates, torch.tensor([0.2, 0.7]), atol=0.005)
