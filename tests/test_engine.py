"""MergeEngine: in-place materialization against hand-computed merges, re-merge tracking, errors, export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny, tiny_family
from transformers import AutoModelForCausalLM

from evomerge.engine import MergeEngine, MergeError, compute_device, tensor_seed
from evomerge.merge import merge_to_dir
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("family"), n=3)
    return str(base), [str(f) for f in fts]


@pytest.fixture(scope="module")
def weights(family):
    base, fts = family
    return [load_file(f"{p}/model.safetensors") for p in [base, *fts]]


@pytest.fixture()
def engine(family):
    base, fts = family
    return MergeEngine([base, *fts], device="cpu")


def _live(engine: MergeEngine, name: str) -> torch.Tensor:
    return engine.model.state_dict()[name]


def test_linear_is_weighted_mean(engine, family, weights):
    base, fts = family
    recipe = Recipe(method="linear",
                    sources=[{"model": p, "parameters": {"weight": w}} for p, w in zip(fts, [0.5, 1, 2])])
    stats = engine.materialize(recipe)
    assert stats.merged == len(engine.names) and stats.skipped == 0
    for name in engine.names:
        expected = (0.5 * weights[1][name] + 1 * weights[2][name] + 2 * weights[3][name]) / 3.5
        torch.testing.assert_close(_live(engine, name), expected, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_gradient_and_filters(engine, family, weights):
    base, fts = family
    recipe = Recipe(method="task_arithmetic", base=base, parameters={"lambda": 0.5}, sources=[
        {"model": fts[0], "parameters": {"weight": {"mlp": [0.0, 1.0], "default": 1.0}}},
        {"model": fts[1], "parameters": {"weight": -1.0}},
    ])
    engine.materialize(recipe)
    b, a, c = weights[0], weights[1], weights[2]
    for name, w0 in [("model.layers.0.mlp.up_proj.weight", 0.0), ("model.layers.1.mlp.up_proj.weight", 1.0),
                     ("model.layers.0.self_attn.q_proj.weight", 1.0), ("model.embed_tokens.weight", 1.0)]:
        expected = b[name] + 0.5 * (w0 * (a[name] - b[name]) - (c[name] - b[name]))
        torch.testing.assert_close(_live(engine, name), expected, rtol=1e-5, atol=1e-6)


def test_only_changed_tensors_are_remerged(engine, family):
    base, fts = family
    def recipe(mlp_weight: float) -> Recipe:
        return Recipe(method="task_arithmetic", base=base, sources=[
            {"model": fts[0], "parameters": {"weight": {"mlp": mlp_weight, "default": 0.5}}}, {"model": fts[1]}])
    engine.materialize(recipe(0.5))
    stats = engine.materialize(recipe(0.9))
    mlp = [n for n in engine.names if ".mlp." in n]
    assert sorted(stats.names) == sorted(mlp) and stats.skipped == len(engine.names) - len(mlp)
    assert engine.materialize(recipe(0.9)).merged == 0


def test_ties_one_source_density_one_is_that_source(engine, family, weights):
    base, fts = family
    engine.materialize(Recipe(method="ties", base=base, sources=[{"model": fts[2], "parameters": {"density": 1.0}}]))
    for name in engine.names:
        torch.testing.assert_close(_live(engine, name), weights[3][name], rtol=1e-6, atol=1e-6)


def test_dare_is_reproducible_and_masks_differ_per_tensor(family):
    base, fts = family
    recipe = Recipe(method="dare_linear", base=base, seed=3, sources=[
        {"model": p, "parameters": {"density": 0.5, "weight": 1.0}} for p in fts])
    first, second = MergeEngine([base, *fts], device="cpu"), MergeEngine([base, *fts], device="cpu")
    first.materialize(recipe)
    second.materialize(recipe)
    for name in first.names:
        assert torch.equal(_live(first, name), _live(second, name))
    other = recipe.model_copy(update={"seed": 4})
    second.materialize(other)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(_live(first, name), _live(second, name))
    assert tensor_seed(3, "a") != tensor_seed(3, "b") and tensor_seed(3, "a") == tensor_seed(3, "a")


def test_engine_equals_merge_cli_and_reload(engine, family, tmp_path):
    from evomerge.cli import main

    base, fts = family
    recipe = Recipe(method="dare_ties", base=base, seed=11, parameters={"lambda": 0.8}, sources=[
        {"model": p, "parameters": {"density": [0.3, 0.9], "weight": 1.0}} for p in fts])
    engine.materialize(recipe)
    path = tmp_path / "r.yaml"
    recipe.to_yaml(path)
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, _live(engine, name)), name
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, engine.model(ids).logits)


def test_a_gpt2_merge_is_a_gpt2_lm_with_its_head_tied_to_the_merged_embedding(tmp_path):
    from transformers import AutoConfig, AutoModel, GPT2Config, GPT2LMHeadModel

    from evomerge.engine import model_class

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():  # a fine-tune: every tensor moved (the tied embedding / head once)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "ft")
    base, ft = str(tmp_path / "base"), str(tmp_path / "ft")
    W, F = load_file(f"{base}/model.safetensors"), load_file(f"{ft}/model.safetensors")
    assert all(n.startswith("transformer.") for n in W) and "lm_head.weight" not in W  # the tied head is not saved
    config = AutoConfig.from_pretrained(base)
    assert config.architectures == ["GPT2LMHeadModel"] and model_class(config, list(W)) is AutoModelForCausalLM
    config.architectures = None  # without architectures the names say it: the LM's prefix, not the bare model's
    assert model_class(config, list(W)) is AutoModelForCausalLM
    assert model_class(config, [n.removeprefix("transformer.") for n in W]) is AutoModel
    config.architectures = ["GPT2Model"]
    assert model_class(config, [n.removeprefix("transformer.") for n in W]) is AutoModel

    engine = MergeEngine([base, ft], device="cpu")
    assert type(engine.model) is GPT2LMHeadModel
    engine.materialize(Recipe(method="task_arithmetic", base=base,
                              sources=[{"model": ft, "parameters": {"weight": 0.5}}]))
    wte, head = engine.model.transformer.wte.weight, engine.model.lm_head.weight
    assert head.data_ptr() == wte.data_ptr()  # still tied: the head is the merged embedding
    name = "transformer.wte.weight"
    torch.testing.assert_close(wte.detach(), W[name] + 0.5 * (F[name] - W[name]), rtol=1e-6, atol=1e-7)
    assert not torch.equal(wte.detach(), W[name])
    out = engine.export(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, engine.model(ids).logits)


def test_bfloat16_live_model_stores_rounded_fp32_result(family, weights):
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu", dtype="bfloat16")
    engine.materialize(Recipe(method="linear", sources=[{"model": p} for p in fts]))
    name = "model.layers.1.self_attn.o_proj.weight"
    expected = ((weights[1][name] + weights[2][name] + weights[3][name]) / 3).to(torch.bfloat16)
    assert _live(engine, name).dtype == torch.bfloat16
    assert torch.equal(_live(engine, name), expected)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (dict(method="nope", sources=[{"model": "FT0"}]), "nope"),
        (dict(method="ties", base="BASE", sources=[{"model": "FT0", "parameters": {"density": [0.5, 1.5]}}]),
         "density"),
        (dict(method="slerp", sources=[{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}]), "slerp"),
        (dict(method="ties", sources=[{"model": "FT0"}, {"model": "FT1"}]), "base"),
        (dict(method="linear", sources=[{"model": "FT0", "parameters": {"wieght": 1}}]), "wieght"),
        (dict(method="linear", sources=[{"model": "/not/loaded"}]), "not loaded with"),
    ],
)
def test_bad_recipes_fail_before_any_write(engine, family, tmp_path, recipe, message):
    base, fts = family
    names = {"BASE": base, "FT0": fts[0], "FT1": fts[1], "FT2": fts[2]}
    recipe = dict(recipe)
    if "base" in recipe:
        recipe["base"] = names[recipe["base"]]
    recipe["sources"] = [{**s, "model": names.get(s["model"], s["model"])} for s in recipe["sources"]]
    before = {n: t.clone() for n, t in engine.model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        engine.materialize(Recipe(**recipe))
    assert all(torch.equal(before[n], t) for n, t in engine.model.state_dict().items())
    if "/not/loaded" not in str(recipe):
        with pytest.raises(ValueError, match=message):
            merge_to_dir(Recipe(**recipe), tmp_path / "out", device="cpu")
        assert not (tmp_path / "out").exists()


def test_values_a_recipe_sets_are_checked_before_any_model_loads(family, tmp_path, monkeypatch):
    import evomerge.merge

    base, fts = family

    def no_engine(*args, **kwargs):
        raise AssertionError("models were loaded before the recipe's values were checked")

    monkeypatch.setattr(evomerge.merge, "MergeEngine", no_engine)
    monkeypatch.setattr(evomerge.merge, "stream_merge", no_engine)  # the tensor-by-tensor path reads models too
    bad = [
        ({"density": {"mlp": 0.5, "self_attn": 1.3, "default": 0.2}}, "'density' = 1.3 is out of range"),  # a filter
        ({"density": [0.1, 1.2]}, "'density' = 1.2 is out of range"),  # a gradient
        ({"densty": 0.5}, "unknown parameter 'densty'"),
    ]
    for params, message in bad:
        recipe = Recipe(method="ties", base=base, sources=[{"model": fts[0], "parameters": params}])
        with pytest.raises(ValueError, match=message):
            merge_to_dir(recipe, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    # a gradient whose per-layer values satisfy breadcrumbs' gamma + density <= 1 although max + max > 1 passes the
    # early check (the band constraint is checked per tensor, on resolved values)
    ok = Recipe(method="breadcrumbs", base=base, sources=[
        {"model": fts[0], "parameters": {"gamma": [0.0, 0.5], "density": [0.9, 0.4]}}])
    with pytest.raises(AssertionError, match="models were loaded"):
        merge_to_dir(ok, tmp_path / "out")


def test_devices_this_machine_cannot_use_are_refused_before_loading(family, tmp_path):
    from evomerge.recipe import RecipeError

    assert compute_device("cpu") == torch.device("cpu")
    for device, message in [("gpu", "unknown device 'gpu'"), ("mps", "not supported by the merge engine")]:
        with pytest.raises(RecipeError, match=message):
            compute_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="CUDA is not available.*--device cpu"):
            MergeEngine([family[0], *family[1]], device="cuda")
        assert compute_device(None) == torch.device("cpu")
    recipe = _fast_recipe("linear", family)
    with pytest.raises(RecipeError, match="unknown device"):
        merge_to_dir(recipe, tmp_path / "out", device="gpu")
    assert not (tmp_path / "out").exists()


def test_nan_source_and_mismatched_sources_are_refused(family, tmp_path):
    from safetensors.torch import save_file

    base, fts = family
    bad = tmp_path / "bad"
    save_tiny(bad, 5, noise_of=base)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN"):
        MergeEngine([base, str(bad)], device="cpu")
    deeper = save_tiny(tmp_path / "deep", 1, num_layers=3)
    with pytest.raises(ValueError, match="model.layers.2"):
        MergeEngine([base, str(deeper)], device="cpu")


def test_nan_result_raises(family, tmp_path):
    from safetensors.torch import save_file

    base, _ = family
    huge = save_tiny(tmp_path / "huge", 6, noise_of=base)
    tensors = load_file(huge / "model.safetensors")
    tensors["model.norm.weight"].fill_(3e38)  # finite, but the sum of two overflows fp32
    save_file(tensors, huge / "model.safetensors", metadata={"format": "pt"})
    engine = MergeEngine([str(huge)], device="cpu")
    recipe = Recipe(method="linear", parameters={"normalize": False},
                    sources=[{"model": str(huge)}, {"model": str(huge)}])
    with pytest.raises(MergeError, match="model.norm.weight.*NaN/Inf"):
        engine.materialize(recipe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_range_is_finite_iff_every_stored_entry_is(dtype):
    from evomerge.engine.kernels import value_range

    finite = torch.tensor([6e4, -6e4, 1.0, -0.0] * 64).to(dtype)  # summed, these would overflow fp16
    assert torch.isfinite(value_range(finite)).all()
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = finite.clone()
        tensor[100] = bad
        assert not torch.isfinite(value_range(tensor)).all()


# --- hot path: chunks, runs of tensors, cached thresholds and in-kernel draws give the plain formula's bits ---
FAST_PATH = {
    "linear": {}, "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.4},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1}, "dare_linear": {"density": 0.6}, "dare_ties": {"density": 0.6},
    "della": {"density": 0.5, "epsilon": 0.2}, "della_linear": {"density": 0.5, "epsilon": 0.2},
}


def _fast_recipe(method: str, family, weights=(1.0, 0.6, 0.3), seed: int = 7) -> Recipe:
    base, fts = family
    return Recipe(method=method, base=None if method == "linear" else base, seed=seed, parameters=FAST_PATH[method],
                  sources=[{"model": p, "parameters": {"weight": w}} for p, w in zip(fts, weights)])


def _plain(recipe: Recipe, weights, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The method's pure function on the whole fp32 tensor, with the tensor's seed: the reference."""
    from evomerge.methods import get_method

    method = get_method(recipe.method)
    sources = torch.stack([weights[i][name] for i in (1, 2, 3)]).float()
    kwargs = {p.key: recipe.parameters.get(p.name, p.default) for p in method.params if not p.per_source}
    kwargs["weight"] = torch.tensor([s.parameters["weight"] for s in recipe.sources])
    for p in method.params:
        if p.per_source and p.name != "weight":
            kwargs[p.key] = torch.full((3,), float(recipe.parameters.get(p.name, p.default)))
    base = weights[0][name].float() if recipe.base else None
    extra = method.whole_tensor_inputs(tensor_seed(recipe.seed, name), None)
    return method.fn(base, sources, **kwargs, **extra).to(dtype)


@pytest.mark.parametrize(("compiled", "dtype"), [(False, "float32"), (False, "bfloat16"), (True, "float32")],
                         ids=["eager-chunks-fp32", "eager-chunks-bf16", "compiled-fp32"])
@pytest.mark.parametrize("method", sorted(FAST_PATH))
def test_chunked_and_grouped_merge_is_bit_identical_to_the_plain_formula(family, weights, method, dtype, compiled,
                                                                           monkeypatch):
    """Runs of tensors, chunks, in-kernel DARE draws, cached thresholds, and the torch.compile kernel (eager numerics)
    give exactly the pure function's result on the whole tensor (fp32 for the compiled kernel: no rounding to
    bf16 could hide a last-bit difference)."""
    base, fts = family
    monkeypatch.setenv("EVOMERGE_COMPILE", "1" if compiled else "0")
    # many chunks per tensor, boundaries inside tensors (the default is 2^18 entries)
    engine = MergeEngine([base, *fts], device="cpu", dtype=dtype, chunk_entries=64)
    recipe = _fast_recipe(method, family)
    engine.materialize(recipe)
    assert engine.kernels.is_compiled(method) == compiled
    for name in engine.names:
        assert torch.equal(_live(engine, name), _plain(recipe, weights, name, getattr(torch, dtype))), name


def test_cached_thresholds_give_the_uncached_bits(family, weights):
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu")
    engine.materialize(_fast_recipe("ties", family))
    cached = engine.inputs.counts()["thresholds"]
    assert cached == len(engine.names)  # one entry per tensor: (tensor, base, sources, keep counts)
    recipe = _fast_recipe("ties", family, weights=(0.2, 1.5, 0.9))  # same densities -> thresholds reused
    engine.materialize(recipe)
    assert engine.inputs.counts()["thresholds"] == cached
    fresh = MergeEngine([base, *fts], device="cpu")
    fresh.materialize(recipe)
    for name in engine.names:
        assert torch.equal(_live(engine, name), _live(fresh, name))
        assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))


def test_new_densities_look_up_the_sorted_magnitudes_and_match_the_radix_select(family, weights):
    """Each task vector is sorted once (per tensor, base and source); candidates with new densities read their
    thresholds from it, bit-identical to the engine without that cache (radix select of every tensor)."""
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu")
    plain_engine = MergeEngine([base, *fts], device="cpu", kept_budget=0)
    for density in (0.4, 0.13, 0.77):
        recipe = _fast_recipe("ties", family).model_copy(update={"parameters": {"density": density}})
        engine.materialize(recipe)
        plain_engine.materialize(recipe)
        assert engine.inputs.counts()["sorted_magnitudes"] == 3 * len(engine.names)
        assert not plain_engine.inputs.counts()["sorted_magnitudes"]
        for name in engine.names:
            assert torch.equal(_live(engine, name), _live(plain_engine, name)), (density, name)
            assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32)), (density, name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-chunks", "compiled"])
def test_angle_methods_reuse_their_gram_matrices_and_give_the_plain_formula(family, weights, compiled, monkeypatch):
    """SLERP and Model Stock: Gram matrices computed once per tensor, then an entrywise combination
    (chunked or compiled) bit-identical to the pure function on the whole tensor, for every new factor / flag."""
    from evomerge.methods import get_method

    monkeypatch.setenv("EVOMERGE_COMPILE", "1" if compiled else "0")
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu", chunk_entries=64)
    cases = [("slerp", None, 2, {"t": t}, t == 0.3) for t in (0.3, 0.8)]  # last: Grams computed for it?
    cases += [("model_stock", base, 3, {"filter_wise": f}, True) for f in (False, True)]
    for method, model_base, n, params, new_grams in cases:
        recipe = Recipe(method=method, base=model_base, parameters=params, sources=[{"model": p} for p in fts[:n]])
        before = engine.inputs.counts()["gram"]
        engine.materialize(recipe)
        fn = get_method(method).fn
        for name in engine.names:
            stack = torch.stack([weights[i + 1][name] for i in range(n)]).float()
            expected = fn(None if model_base is None else weights[0][name].float(), stack, **params)
            assert torch.equal(_live(engine, name), expected), (method, params, name)
        assert engine.inputs.counts()["gram"] - before == (len(engine.names) if new_grams else 0), (method, params)


def test_della_keeps_its_ranks_and_falls_back_when_they_do_not_fit(family, weights):
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu")
    for density in (0.5, 0.3):  # new parameters: the ranks of the task vectors are reused
        recipe = _fast_recipe("della", family).model_copy(update={"parameters": {"density": density, "epsilon": 0.1}})
        engine.materialize(recipe)
        assert engine.inputs.counts()["ranks"] == len(engine.names)
        for name in engine.names:
            assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32)), (density, name)
    small = MergeEngine([base, *fts], device="cpu", kept_budget=0)  # nothing fits: merged whole by the pure function
    small.materialize(recipe)
    assert not small.inputs.counts()["ranks"]
    for name in engine.names:
        assert torch.equal(_live(small, name), _live(engine, name))


def test_cache_bytes_count_what_is_kept_and_clear_caches_frees_it(family, weights):
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu")
    numel = sum(engine.sources.spans[n].numel for n in engine.names)
    engine.materialize(_fast_recipe("dare_ties", family))
    engine.materialize(_fast_recipe("ties", family))
    held = engine.cache_bytes()
    assert held["draws"] == 3 * engine.sources.total * 4  # float32 draws for 3 sources, laid out like the models
    assert 3 * numel * 2 <= held["sorted_magnitudes"] < 3 * numel * 2 + 3 * len(engine.names) * 32768 * 12
    assert held["ranks"] == 0 and held["gram"] == 0 and held["thresholds"] > 0
    assert engine.inputs.kept_budget.used == held["sorted_magnitudes"]
    assert engine.inputs.draws_budget.used == held["draws"]
    engine.clear_caches()
    assert not any(engine.cache_bytes().values())
    assert engine.inputs.kept_budget.used == 0 and engine.inputs.draws_budget.used == 0
    recipe = _fast_recipe("ties", family, weights=(0.4, 0.2, 1.1))
    engine.materialize(recipe)  # recomputed when needed, same bits
    for name in engine.names:
        assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))


def test_live_tensors_replaced_from_outside_are_still_written(family, weights):
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu")
    name = "model.layers.0.mlp.up_proj.weight"
    param = dict(engine.model.named_parameters())[name]
    param.data = torch.zeros_like(param)  # e.g. what model.to() does: the parameter gets new storage
    recipe = _fast_recipe("linear", family)
    engine.materialize(recipe)
    assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))


def test_a_failing_compile_falls_back_to_the_eager_formula(family, weights, monkeypatch):
    base, fts = family

    def broken_compile(*args, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = MergeEngine([base, *fts], device="cpu")
    recipe = _fast_recipe("ties", family)
    engine.materialize(recipe)
    assert not engine.kernels.is_compiled("ties")  # disabled for the next candidates
    for name in engine.names:
        assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))


def test_stored_dare_draws_give_the_unstored_bits(family, weights):
    base, fts = family
    engine = MergeEngine([base, *fts], device="cpu", chunk_entries=64)
    engine.materialize(_fast_recipe("dare_ties", family, seed=5))
    assert engine.inputs.counts()["draws"] == len(engine.names)  # every tensor's draw is kept for the next candidate
    recipe = _fast_recipe("dare_ties", family, weights=(0.3, 1.2, 0.8), seed=5)  # same seed: draws reused
    engine.materialize(recipe)
    for name in engine.names:
        assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))
    engine.inputs.draws_budget.limit = 0  # a new seed: seed 5's draws are dropped, nothing fits: drawn in the kernel
    other = _fast_recipe("dare_ties", family, seed=6)
    engine.materialize(other)
    assert not engine.cache_bytes()["draws"]
    for name in engine.names:
        assert torch.equal(_live(engine, name), _plain(other, weights, name, torch.float32))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))  # new seed, new masks


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "in-kernel"])
def test_compiled_dare_draws_give_the_plain_formula(family, weights, stored, monkeypatch):
    base, fts = family
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    engine = MergeEngine([base, *fts], device="cpu", **({} if stored else {"draws_budget": 0}))
    recipe = _fast_recipe("dare_linear", family, seed=9)
    engine.materialize(recipe)
    assert engine.kernels.is_compiled("dare_linear") and engine.kernels.is_compiled("draws") == stored
    for name in engine.names:
        assert torch.equal(_live(engine, name), _plain(recipe, weights, name, torch.float32))


def test_budget_refuses_what_does_not_fit_and_takes_nothing():
    from evomerge.engine.inputs import Budget

    budget = Budget(100)
    assert budget.reserve(60) and not budget.reserve(41) and budget.used == 60  # a refusal takes nothing
    assert budget.reserve(40) and budget.used == 100
    budget.limit = 0  # lowered: what is held stays, nothing new fits
    assert not budget.reserve(1) and budget.reserve(-10) and budget.used == 90
    budget.release(90)
    assert budget.used == 0 and not budget.reserve(1)


def test_kernel_settings_are_checked_and_override_the_environment(family, monkeypatch):
    from evomerge.engine.kernels import Kernels

    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    assert not Kernels(torch.device("cpu"), 10, compile=False).compile
    assert Kernels(torch.device("cpu"), 10).compile  # the environment decides when unset
    monkeypatch.delenv("EVOMERGE_COMPILE")
    assert not Kernels(torch.device("cpu"), 10, compile_min_entries=11).compile
    assert Kernels(torch.device("cpu"), 11, compile_min_entries=11).compile
    with pytest.raises(ValueError, match="multiple of 64"):
        MergeEngine(list(family[:1]), device="cpu", chunk_entries=100)
