"""Memory planning: the estimate, the choice between resident and memory-mapped sources, cgroup limits, and the
engine in mapped mode giving the resident engine's bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_family

from evomerge.engine import MergeEngine
from evomerge.engine.memory import HEADROOM, MemoryPlanError, _cgroup_free, plan_memory
from evomerge.recipe import Recipe

GIB = 2**30


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("family"), n=3)
    return str(base), [str(f) for f in fts]


def test_plan_prefers_resident_then_mapped_then_refuses_with_the_numbers():
    # working set: (3 models + 3) * 4 bytes * 2^20 entries = 24 MiB
    common = {"live_model": GIB, "source_bytes": 3 * GIB, "largest_tensor": 1 << 20, "n_models": 3}
    working = 6 * 4 * (1 << 20)
    fits = (2 * GIB + 3 * GIB + working) / HEADROOM
    assert plan_memory(**common, available=int(fits) + 1).sources == "resident"
    mapped = plan_memory(**common, available=int(fits) - 1)
    assert mapped.sources == "mapped" and mapped.mapped_need == 2 * GIB + working
    with pytest.raises(MemoryPlanError, match=r"need 2\.02 GiB .*live model 1\.00 GiB.*only 0\.50 GiB is free"):
        plan_memory(**common, available=GIB // 2)


def _fake_cgroup(tmp_path: Path, v1: bool, limit: str, usage: int, inactive: int) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    if v1:
        base = root / "memory" / "job"
        base.mkdir(parents=True)
        (base / "memory.limit_in_bytes").write_text(limit)
        (base / "memory.usage_in_bytes").write_text(str(usage))
        (base / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")
        lines = "9:memory:/job\n1:name=systemd:/\n"
    else:
        base = root / "job"
        base.mkdir(parents=True)
        (base / "memory.max").write_text(limit)
        (base / "memory.current").write_text(str(usage))
        (base / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")
        lines = "0::/job\n"
    own = tmp_path / "self_cgroup"
    own.write_text(lines)
    return root, own


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
def test_cgroup_allowance_counts_inactive_file_pages_as_free(tmp_path, v1):
    root, own = _fake_cgroup(tmp_path, v1, str(1000), usage=900, inactive=300)
    assert _cgroup_free(root, own) == 1000 - 900 + 300
    root, own = _fake_cgroup(tmp_path / "nolimit", v1, "9223372036854771712" if v1 else "max", usage=5, inactive=0)
    assert _cgroup_free(root, own) is None


def test_mapped_sources_give_the_resident_bits(family, monkeypatch):
    """With too little memory for resident sources, the engine maps them and merges tensor by tensor: the same
    bits as the resident engine, for an entrywise method (TIES) and a stochastic one (DARE)."""
    base, fts = family
    resident = MergeEngine([base, *fts], device="cpu")
    assert resident.memory.sources == "resident"
    monkeypatch.setattr("evomerge.engine.engine.available_bytes", lambda device: resident.memory.mapped_need * 1.05
                        / HEADROOM)
    mapped = MergeEngine([base, *fts], device="cpu")
    assert mapped.memory.sources == "mapped" and mapped.sources.flat is None
    for method, params in (("ties", {"density": 0.4}), ("dare_ties", {"density": 0.4}), ("linear", {})):
        recipe = Recipe(method=method, base=base, seed=3, parameters=params,
                        sources=[{"model": p, "parameters": {"weight": w}} for p, w in zip(fts, (0.7, 1.2, 0.4))])
        resident.materialize(recipe)
        mapped.materialize(recipe)
        for name in resident.names:
            assert torch.equal(resident.targets.tensors[name], mapped.targets.tensors[name]), (method, name)


def test_models_that_do_not_fit_even_mapped_are_refused_before_loading(family, monkeypatch):
    base, fts = family
    monkeypatch.setattr("evomerge.engine.engine.available_bytes", lambda device: 1024)
    monkeypatch.setattr("evomerge.engine.engine.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(MemoryPlanError, match="not enough memory"):
        MergeEngine([base, *fts], device="cpu")
