"""Memory planning: the estimate, the choice between resident and memory-mapped sources, cgroup limits, and the
engine in mapped mode giving the resident engine's bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_family

from evomerge.engine import MergeEngine
from evomerge.engine.memory import (
    HEADROOM,
    SELECT_BYTES,
    SORT_BYTES,
    MemoryPlanError,
    _cgroup_free,
    plan_memory,
    working_set_bytes,
)
from evomerge.recipe import Recipe, RecipeError

GIB = 2**30


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("family"), n=3)
    return str(base), [str(f) for f in fts]


def test_working_set_is_the_largest_of_formula_selection_and_sorting():
    # 2^20 entries: a formula holds (models + 3) fp32 copies; TIES' radix select of one task vector 13 B per entry,
    # CUDA's topk 20; two threads sorting two such tensors 2 * 18 = 36 (CPU only)
    m = 1 << 20
    assert working_set_bytes(largest_tensor=m, n_models=3, device_type="cpu") == 24 * m  # (3 + 3) * 4 > 13
    assert working_set_bytes(largest_tensor=m, n_models=1, device_type="cuda", sorted_entries=2 * m) == 20 * m
    assert working_set_bytes(largest_tensor=m, n_models=1, device_type="cpu", sorted_entries=2 * m) == 36 * m
    assert working_set_bytes(largest_tensor=m, n_models=1, device_type="cpu") == 16 * m  # (1 + 3) * 4 > 13
    assert working_set_bytes(largest_tensor=m, n_models=2, device_type="cuda") == 20 * m  # 20 > (2 + 3) * 4


# The peak of each selection step in a fresh process (VmHWM, reset through /proc/self/clear_refs; tracemalloc does
# not see torch's allocations), from the task vectors' creation on: what SELECT_BYTES / SORT_BYTES count.
PEAK = """
import json, sys, torch
from pathlib import Path
from evomerge.methods.select import SortedMagnitudes
from evomerge.methods.sparsify import kth_magnitudes
torch.set_num_threads(1)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
m = 1 << 22
peaks = {}
for step in ("select", "sort"):
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    if step == "select":
        tau = torch.rand(1, m)
        kth_magnitudes(tau, torch.tensor([m // 3]))
    else:
        tau = torch.rand(m)
        SortedMagnitudes.build(tau.abs_())
    del tau
    peaks[step] = status("VmHWM:") - before
print(json.dumps(peaks))
"""


def test_selection_peaks_measured_match_the_counted_bytes():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs cannot be written here (the peak RSS cannot be reset)")
    done = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=120, check=True)
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    m = 1 << 22
    counted = {"select": SELECT_BYTES["cpu"] * m, "sort": SORT_BYTES * m}
    # at most 10% below (pages not touched) and 5% + 16 MiB above: the first radix select's one-time set-up measured
    # ~10 MiB whatever the size (2^22 and 2^23 entries), the k-th bucket's int64 ids and the histograms < 1%
    for step, peak in peaks.items():
        assert 0.9 * counted[step] <= peak <= 1.05 * counted[step] + 16 * 2**20, (step, peak / m, counted[step] / m)


def test_plan_prefers_resident_then_mapped_then_refuses_with_the_numbers():
    # working set: (3 models + 3) * 4 bytes * 2^20 entries = 24 MiB
    working = 6 * 4 * (1 << 20)
    common = {"live_model": GIB, "source_bytes": 3 * GIB, "working_set": working, "n_models": 3}
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


def test_a_nan_source_is_named_when_mapped_as_when_resident(family, tmp_path, monkeypatch):
    """A mapped source is not read at load, so its NaN shows first in the merged tensor: the error still names the
    tensor and the source (as the resident engine does at load), not the merge's parameters; evomerge merge too."""
    from safetensors.torch import load_file, save_file

    from evomerge.engine.streaming import stream_merge

    base, fts = family
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(fts[0]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 2] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    named = r"tensor 'model.layers.1.mlp.up_proj.weight' holds NaN/Inf in \['" + str(bad) + r"'\]"
    with pytest.raises(RecipeError, match=named):
        MergeEngine([base, str(bad)], device="cpu")  # resident: refused at load
    recipe = Recipe(method="ties", base=base, parameters={"density": 0.5},
                    sources=[{"model": str(bad)}, {"model": fts[1]}])
    with pytest.raises(RecipeError, match=named):
        stream_merge(recipe, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    need = MergeEngine([base, *fts[:2]], device="cpu").memory.mapped_need  # the same shapes, finite
    monkeypatch.setattr("evomerge.engine.engine.available_bytes", lambda device: need * 1.05 / HEADROOM)
    mapped = MergeEngine([base, str(bad), fts[1]], device="cpu")
    assert mapped.memory.sources == "mapped"
    with pytest.raises(RecipeError, match=named):
        mapped.materialize(recipe)


def test_working_set_counts_dellas_ranks_per_thread():
    # 4 models (3 task vectors against the base), 2 threads ranking two 2^20-entry tensors: per entry and source τ,
    # |τ| and the int64 ranks (16 B) plus one row's keys, shifted keys, index, run starts and mask (33 B): 81 B per
    # entry, 162 B per largest-tensor entry, more than the sorts (2 * 18), the formula (7 * 4) or the selection
    m = 1 << 20
    assert working_set_bytes(largest_tensor=m, n_models=4, device_type="cpu", sorted_entries=2 * m) == 162 * m
    # many sources: the ranks' fp32 copy and its division (20 B per entry and source) outgrow the row arrays
    assert working_set_bytes(largest_tensor=m, n_models=11, device_type="cpu", sorted_entries=m) == 200 * m
    assert working_set_bytes(largest_tensor=m, n_models=4, device_type="cuda", sorted_entries=2 * m) == 120 * m


def test_the_engine_plans_dellas_ranks_only_when_a_ranking_method_may_run(family):
    """The working set of 4 tiny models (the largest tensor's entries m, the threads' largest tensors S): with DELLA
    possible, the ranks' (16 * 3 + 33) * S; planned for TIES and linear only, the largest of the rest."""
    base, fts = family
    anything = MergeEngine([base, *fts], device="cpu").memory.working_set
    ties = MergeEngine([base, *fts], device="cpu", methods=["ties", "linear"]).memory.working_set
    della = MergeEngine([base, *fts], device="cpu", methods=["della"]).memory.working_set
    from safetensors import safe_open

    with safe_open(f"{base}/model.safetensors", "pt") as f:
        entries = sorted((int(torch.Size(f.get_slice(n).get_shape()).numel()) for n in f.keys()), reverse=True)
    threads = sum(entries[:torch.get_num_threads()])
    assert anything == della == (16 * 3 + 33) * threads
    assert ties == max(7 * 4 * entries[0], SELECT_BYTES["cpu"] * entries[0], SORT_BYTES * threads) < della


# Peaks of DELLA's ranks (the engine's) and of whole-tensor calls (the streaming merge's), each from the first row
# read on, in a fresh process whose allocator returns every freed 1 MiB+ block (MALLOC_MMAP_THRESHOLD_: glibc's
# dynamic threshold would otherwise keep freed rows and hide the next step's peak). argv: JSON [[step, N], ...].
STEP_PEAKS = """
import json, sys, torch
from pathlib import Path
from evomerge.methods import get_method
from evomerge.methods.sparsify import relative_ranks
torch.set_num_threads(1)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
def run(step, n, with_base, m):
    if step == "ranks":
        return relative_ranks(torch.rand(n, m))
    method = get_method(step)
    base = torch.rand(m) if with_base else None  # read first, as the streaming merge reads it
    stack = torch.stack([torch.rand(m) for _ in range(n)])
    values = {"t": 0.5, "weight": 1.0, "density": 0.5}  # as plan.method_kwargs passes them (not imported: slow)
    kwargs = {p.kwarg or p.name: torch.full((n,), values.get(p.name, p.default), dtype=torch.float64)
              if p.per_source else values.get(p.name, p.default) for p in method.params}
    return method.fn(base, stack, **kwargs, **method.whole_tensor_inputs(1, None))
m = 1 << 21
peaks = []
for step, n, with_base in json.loads(sys.argv[1]):
    run(step, n, with_base, 64)  # first-call set-up (kernels, NumPy) outside the measurement
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    result = run(step, n, with_base, m)
    del result
    peaks.append((status("VmHWM:") - before) / m)
print(json.dumps(peaks))
"""


def _step_peaks(steps: list[tuple[str, int, bool]]) -> list[float]:
    """Measured peak bytes per entry of each step (see STEP_PEAKS)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs cannot be written here (the peak RSS cannot be reset)")
    done = subprocess.run([sys.executable, "-c", STEP_PEAKS, json.dumps(steps)], capture_output=True, text=True,
                          timeout=600, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def _counted(step: str, n: int, with_base: bool) -> float:
    from evomerge.engine.memory import rank_bytes, stream_working_set_bytes
    from evomerge.methods import get_method

    if step == "ranks":
        return rank_bytes(n, "cpu")
    return stream_working_set_bytes(get_method(step), largest_tensor=1, n_sources=n, base=with_base)


def test_rank_and_whole_tensor_peaks_measured_match_the_counted_bytes():
    """DELLA's ranks (RANK_BYTES) and the streaming merge's whole-tensor TIES and DELLA calls (their declared
    ``whole_tensor_bytes``): the measured peak is at most the count (+2% and 2 MiB: NumPy's sort buffers, page
    rounding) and at least 85% of it."""
    steps = [("ranks", 1, False), ("ranks", 3, False), ("ties", 1, True), ("ties", 3, True), ("della", 1, True),
             ("della", 3, True)]
    for (step, n, with_base), peak in zip(steps, _step_peaks(steps)):
        counted = _counted(step, n, with_base)
        assert 0.85 * counted <= peak <= 1.02 * counted + 1, (step, n, peak, counted)  # 1 B per entry = 2 MiB


@pytest.mark.slow
def test_every_streamed_method_declares_a_bound_of_its_measured_peak():
    """Every method the streaming merge runs on dense rows: the declared ``whole_tensor_bytes`` bound the measured
    peak at 1, 2, 3 and 6 sources, with and without a base where it is optional, and the bound is nearly reached
    somewhere (within 15%; 25% for breadcrumbs, which shares breadcrumbs_ties' larger bound): it is the method's,
    not a blanket number."""
    from evomerge.methods.registry import METHODS

    streamed = [m for m in METHODS.values() if not m.statistic and not m.takes_factors]
    assert all(m.whole_tensor_bytes is not None for m in streamed)
    steps = [(m.name, n, with_base) for m in streamed for n in (1, 2, 3, 6)
             for with_base in sorted({True, m.needs_base}) if m.min_sources <= n <= (m.max_sources or n)]
    ratios: dict[str, float] = {}
    for (step, n, with_base), peak in zip(steps, _step_peaks(steps)):
        counted = _counted(step, n, with_base)
        assert peak <= 1.02 * counted + 1, (step, n, with_base, peak, counted)
        ratios[step] = max(ratios.get(step, 0.0), peak / counted)
    assert all(r >= (0.75 if name == "breadcrumbs" else 0.85) for name, r in ratios.items()), ratios


def test_evomerge_merge_refuses_what_does_not_fit_in_one_line_before_writing(family, tmp_path, monkeypatch, capsys):
    """``evomerge merge`` (tensor by tensor) needs one output shard and its largest tensor's working set: the whole
    output here (under one shard) + TIES' declared (20 N + 20) bytes per entry of the embedding. Refused one byte
    under that (the limit set as the existing tests set it, through available_bytes), merged one byte over."""
    from safetensors import safe_open
    from test_cli_errors import one_line

    from evomerge.cli import main
    from evomerge.engine.memory import HEADROOM
    from evomerge.outdir import format_size

    base, fts = family
    recipe = tmp_path / "ties.yaml"
    Recipe(method="ties", base=base, parameters={"density": 0.5},
           sources=[{"model": p} for p in fts]).to_yaml(recipe)
    with safe_open(f"{base}/model.safetensors", "pt") as f:
        shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    entries = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    assert "lm_head.weight" in entries  # an untied head: every tensor is written
    need = 4 * sum(entries.values()) + (20 * len(fts) + 20) * max(entries.values())  # fp32 output + working set
    monkeypatch.setattr("evomerge.engine.streaming.available_bytes", lambda device: int(need / HEADROOM) - 1)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) != 0
    err = one_line(capsys)  # the one error line (the display's "read sources" aside)
    assert err.startswith("not enough memory for merging 3 sources with ties tensor by tensor")
    limit = format_size(int(need / HEADROOM) - 1)
    assert f"= {format_size(need)} needed within 90% of the free {limit}; free memory, lower --max-shard-size" in err
    assert "fewer sources" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("evomerge.engine.streaming.available_bytes", lambda device: int(need / HEADROOM) + 1)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


# The tiny Llama's shapes (tests/tiny_models.py: hidden 16, MLP 32, 2 KV heads of 4, vocabulary 64, untied head):
# entries per layer (q, o 16x16; k, v 8x16; gate, up, down 32x16; two norms 16) and outside the layers (embeddings,
# head 64x16; final norm 16), all fp32.
H, MLP, KV, VOCAB = 16, 32, 8, 64
LAYER = 2 * H * H + 2 * KV * H + 3 * MLP * H + 2 * H
OUTSIDE = 2 * VOCAB * H + H


def _limited(monkeypatch, need: int, delta: int) -> None:
    """Free memory just over (``delta`` 1) or under (-1) what ``need`` asks for within the planner's headroom."""
    monkeypatch.setattr("evomerge.merge.available_bytes", lambda device: int(need / HEADROOM) + delta)


def test_a_layer_stack_that_does_not_fit_is_refused_before_any_layer_is_read(family, tmp_path, monkeypatch, capsys):
    """``evomerge merge`` of a layer stack holds every tensor of the stack as read and one output shard (here the
    whole output): 4 layers of the tiny Llama, 2 * 4 B * (4 layers + the tensors outside them)."""
    from test_cli_errors import one_line

    from evomerge.cli import main
    from evomerge.outdir import format_size
    from evomerge.recipe import StackRecipe

    base, fts = family
    recipe = tmp_path / "stack.yaml"
    StackRecipe(slices=[{"model": fts[0], "layer_range": [0, 2]}, {"model": fts[1], "layer_range": [0, 2]}],
                ).to_yaml(recipe)
    need = 2 * 4 * (4 * LAYER + OUTSIDE)
    _limited(monkeypatch, need, -1)
    monkeypatch.setattr("evomerge.merge.stack_layers", lambda *a: pytest.fail("read the layers"))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    line = one_line(capsys)
    assert line.startswith("not enough memory for a layer stack of 4 layers: the stacked model's "
                           f"tensors as read {format_size(need // 2)} + one output shard {format_size(need // 2)} = "
                           f"{format_size(need)} needed within 90% of the free"), line
    assert "stack fewer layers" in line and not (tmp_path / "out").exists()
    monkeypatch.undo()
    _limited(monkeypatch, need, 1)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > need // 2  # the stack, and its header


def test_a_layer_stacking_search_is_refused_before_its_first_trial(family, tmp_path, monkeypatch, capsys):
    """A trial of the stacking space holds the stack's tensors as read and the stacked model (fp32 on CPU): at most
    the space's 3 slots (1.5 x 2 layers) of the largest layer. Refused before the run dir is made."""
    import yaml
    from search_fitness import search_settings
    from test_cli_errors import SPACES, one_line

    from evomerge.cli import main

    need = 2 * 4 * (3 * LAYER + OUTSIDE)
    config = tmp_path / "stack.yaml"
    config.write_text(yaml.safe_dump(search_settings(family, tmp_path / "run", space=str(SPACES /
                                                                                         "layer_stacking.yaml"))))
    _limited(monkeypatch, need, -1)
    assert main(["search", str(config)]) == 2
    assert "not enough memory for a layer stack of 3 layers" in one_line(capsys)
    assert not (tmp_path / "run").exists()
    from evomerge.checkpoint import Checkpoint
    from evomerge.merge import check_stack_memory, stack_needs

    checkpoints = {p: Checkpoint.open(p) for p in family[1]}
    needs = stack_needs(checkpoints, [(family[1][0], 1)] * 3, dtype=torch.float32, live=True,
                        device=torch.device("cpu"))
    assert sum(n.nbytes for n in needs) == need
    _limited(monkeypatch, need, 1)
    check_stack_memory(checkpoints, [(family[1][0], 1)] * 3, dtype=torch.float32, device=torch.device("cpu"),
                       live=True)


def test_an_moe_that_does_not_fit_is_refused_before_it_is_built(family, tmp_path, monkeypatch, capsys):
    """``evomerge merge`` of an MoE of 2 experts (random gates) holds the live Mixtral (the base's attention, norms,
    embeddings and head, both experts' MLPs, the routers), one layer's expert MLPs as read and stacked (2 fp32 copies
    and the cast), the export's copy and one shard (here all of it)."""
    from test_cli_errors import one_line

    from evomerge.cli import main
    from evomerge.recipe import MoeRecipe

    base, fts = family
    recipe = tmp_path / "moe.yaml"
    MoeRecipe(base=base, experts=[{"model": fts[0]}, {"model": fts[1]}], gate_mode="random",
              experts_per_token=1).to_yaml(recipe)
    mlp = 3 * MLP * H
    live = 4 * (OUTSIDE + 2 * (LAYER - mlp) + 2 * 2 * mlp + 2 * 2 * H)
    need = 3 * live + 2 * mlp * (4 + 4 + 4)
    _limited(monkeypatch, need, -1)
    monkeypatch.setattr("evomerge.moe.MoeModel", lambda *a, **k: pytest.fail("built the MoE"))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    line = one_line(capsys)
    assert "not enough memory for a mixture of 2 experts: the live MoE" in line and "fewer experts" in line, line
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    _limited(monkeypatch, need, 1)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


# The peak of forming one adapter source's tensor W + s·B·A in a fresh process (as STEP_PEAKS measures), from the
# base tensor's copy as read (Checkpoint.get copies) on, for an fp32 and a bf16 base, a plain and a transposed ΔW.
ADAPTER_PEAK = """
import json, torch
from pathlib import Path
from evomerge.adapters import LoraFactors, adapted_tensor
torch.set_num_threads(1)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
d_out, d_in, r = 2048, 1024, 8
peaks = []
for dtype in (torch.float32, torch.bfloat16):
    for transpose in (False, True):
        A, B = torch.rand(r, d_in), torch.rand(d_out, r)
        stored = torch.rand((d_in, d_out) if transpose else (d_out, d_in)).to(dtype)
        adapted_tensor(stored.clone(), LoraFactors(A, B, 2.0, transpose), None, dtype)  # first-call set-up
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS:")
        row = adapted_tensor(stored.clone(), LoraFactors(A, B, 2.0, transpose), None, dtype)
        peaks.append((status("VmHWM:") - before) / (d_out * d_in))
        del row
print(json.dumps(peaks))
"""


def test_forming_an_adapters_tensor_peaks_at_the_counted_bytes():
    """``adapter_bytes``: W as read, B·A and s·B·A in fp32, and W's fp32 copy for a bf16 base (12 B per entry for
    fp32, 14 for bf16): the measured peak is at most the count (+2%, 1 B per entry) and at least 85% of it."""
    from evomerge.engine.memory import adapter_bytes

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs cannot be written here (the peak RSS cannot be reset)")
    done = subprocess.run([sys.executable, "-c", ADAPTER_PEAK], capture_output=True, text=True, timeout=300,
                          check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert (adapter_bytes(4), adapter_bytes(2)) == (12, 14)
    for peak, counted in zip(peaks, [12, 12, 14, 14]):
        assert 0.85 * counted <= peak <= 1.02 * counted + 1, (peaks, counted)


def test_adapter_sources_are_planned_with_their_formed_rows(tmp_path):
    """An engine over a base and four LoRA adapters of its head: the whole-tensor working set counts the four
    sources' rows of the head (the largest adapted tensor) in a list and stacked, and one being formed
    ((2 * 4 * 4 + 12) B per entry: more than full sources of these shapes need); the resident plan also counts a
    run's rows of the four sources over every merged entry and one adapted tensor's copy and forming
    (LowRankStacks.run_rows)."""
    from lora_models import save_adapter
    from tiny_models import save_tiny

    base = save_tiny(tmp_path / "base", 0)
    adapters = [str(save_adapter(base, tmp_path / f"a{i}", i, r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
                for i in range(4)]
    fts = [str(save_tiny(tmp_path / f"ft{i}", 100 + i, noise_of=base)) for i in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread's sort: the formula, (5 + 3) * 4 B per head entry, is the full sources'
    try:
        engine = MergeEngine([str(base), *adapters], device="cpu", methods=["linear"])
        full = MergeEngine([str(base), *fts], device="cpu", methods=["linear"]).memory.working_set
    finally:
        torch.set_num_threads(threads)
    head = VOCAB * H
    assert engine.memory.working_set == (2 * 4 * 4 + 12) * head > full == (5 + 3) * 4 * head
    assert engine.memory.run_rows == 4 * 4 * (2 * LAYER + OUTSIDE) + (4 + 12) * head
    assert engine.memory.resident_need == 2 * engine.memory.live_model + engine.memory.source_bytes + max(
        engine.memory.working_set, engine.memory.run_rows)
