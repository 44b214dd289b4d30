"""LoRA adapters as merge sources (evomerge.adapters, engine/lowrank.py): the model an adapter makes is PEFT's
merge_and_unload, bit for bit; a recipe on adapters gives the weights of the same recipe on those merged full
checkpoints, in the engine and in the streaming merge; bad adapters are refused before any tensor work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_models import lora_family
from safetensors.torch import load_file, save_file

from evomerge.adapters import AdapterError
from evomerge.engine import MergeEngine
from evomerge.engine.lowrank import stack_bytes
from evomerge.engine.plan import open_sources
from evomerge.engine.streaming import stream_merge
from evomerge.recipe import Recipe, RecipeError

ADAPTER_NAMES = ["plain", "rslora", "saved"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    return {k: str(v) for k, v in lora_family(tmp_path_factory.mktemp("lora")).items()}


def _recipe(method: str, base: str, sources: list[str], **params: object) -> Recipe:
    per_source = {k: v for k, v in params.items() if k in ("weight", "density")}
    return Recipe(method=method, base=base, sources=[{"model": s, "parameters": per_source} for s in sources],
                  parameters={k: v for k, v in params.items() if k not in per_source}, seed=3)


def test_an_adapter_reads_as_peft_merge_and_unload_bit_for_bit(family):
    # rsLoRA scale, rank_pattern / alpha_pattern, a LoRA embedding with its saved base layer, modules_to_save
    opened = open_sources([family["base"], *(family[n] for n in ADAPTER_NAMES)])
    for i, name in enumerate(ADAPTER_NAMES, start=1):
        full = load_file(f"{family[name + '_full']}/model.safetensors")
        view = opened.checkpoints[i]
        assert sorted(view.names) == sorted(full)
        for tensor in full:
            assert torch.equal(view.get(tensor), full[tensor]), (name, tensor)
    # the adapter holds factors, not a model: what it stores is a fraction of the base, and so is what the engine's
    # memory plan counts for it (stack_bytes: the base's tensors + each adapter's factors and saved tensors)
    base_bytes = sum(opened.checkpoints[0].nbytes(n) for n in opened.names)
    assert sum(opened.checkpoints[1].nbytes(n) for n in opened.names) < base_bytes / 5
    factor_bytes = sum(ck.adapter.total_bytes for ck in opened.checkpoints[1:])
    assert stack_bytes(opened.checkpoints, opened.names, 4) == base_bytes + factor_bytes


def test_an_unchanged_embedding_base_layer_is_no_replacement_and_a_changed_one_is(family, tmp_path):
    # PEFT saves a targeted embedding's own weight (save_embedding_layers "auto") though training left it as it was:
    # the adapter then stays factors-only there (composable, writable as a merged adapter)
    weights = load_file(f"{family['saved']}/adapter_model.safetensors")
    (key,) = [k for k in weights if ".base_layer." in k]
    name = "model.embed_tokens.weight"
    adapter = open_sources([family["base"], family["saved"]]).checkpoints[1].adapter
    assert set(adapter.replaced) == {"lm_head.weight"} and name in adapter.factors
    changed = _copy(family["saved"], tmp_path / "changed")
    save_file({**weights, key: weights[key] + 1.0}, str(changed / "adapter_model.safetensors"))
    view = open_sources([family["base"], str(changed)]).checkpoints[1]
    assert set(view.adapter.replaced) == {"lm_head.weight", name}
    assert torch.equal(view.get(name), (weights[key] + 1.0) + view.adapter.factors[name].delta())


METHOD_PARAMS = [
    ("task_arithmetic", {"weight": 0.7, "lambda": 1.1}),
    ("ties", {"density": 0.4, "weight": 1.0}),
    ("dare_ties", {"density": 0.6, "weight": 0.8}),
    ("linear", {"weight": 1.0}),
    ("della", {"density": 0.5, "epsilon": 0.1, "weight": 1.0}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05, "weight": 1.0}),
]


@pytest.mark.parametrize("method,params", METHOD_PARAMS, ids=[m for m, _ in METHOD_PARAMS])
def test_a_recipe_on_adapters_is_the_recipe_on_their_merged_checkpoints(family, method, params):
    adapters = [family[n] for n in ADAPTER_NAMES]
    fulls = [family[n + "_full"] for n in ADAPTER_NAMES]
    on_adapters = MergeEngine([family["base"], *adapters], device="cpu")
    on_fulls = MergeEngine([family["base"], *fulls], device="cpu")
    on_adapters.materialize(_recipe(method, family["base"], adapters, **params))
    on_fulls.materialize(_recipe(method, family["base"], fulls, **params))
    got, want = on_adapters.state_dict(), on_fulls.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           load_file(f"{family['base']}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"])


def test_mixed_sources_change_only_what_changed_and_match_the_streaming_merge(family, tmp_path):
    sources = [family["ft"], family["plain"], family["saved"]]
    engine = MergeEngine([family["base"], *sources], device="cpu")
    reference = MergeEngine([family["base"], family["ft"], family["plain_full"], family["saved_full"]], device="cpu")
    recipe = _recipe("ties", family["base"], sources, density=0.5, weight=1.0)
    engine.materialize(recipe)
    reference.materialize(_recipe("ties", family["base"], [family["ft"], family["plain_full"], family["saved_full"]],
                                  density=0.5, weight=1.0))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(engine.state_dict()[name], tensor), name
    # a new weight for one source re-merges every tensor again (the weight is in every tensor's parameters) ...
    stats = engine.materialize(_recipe("ties", family["base"], sources, density=0.5, weight=0.9))
    assert stats.merged == len(engine.names)
    # ... the same recipe nothing
    assert engine.materialize(_recipe("ties", family["base"], sources, density=0.5, weight=0.9)).merged == 0
    streamed = stream_merge(_recipe("ties", family["base"], sources, density=0.5, weight=0.9), tmp_path / "out",
                            device="cpu")
    written = load_file(f"{streamed}/model.safetensors")
    live = engine.state_dict()
    for name, tensor in written.items():
        assert torch.equal(live[name], tensor), name


def test_grouped_runs_and_one_tensor_at_a_time_agree(family):
    # linear is merged in runs of neighbouring tensors; with chunk_entries tiny every run is cut in many chunks
    adapters = [family[n] for n in ADAPTER_NAMES]
    recipe = _recipe("task_arithmetic", family["base"], adapters, weight=0.5)
    a = MergeEngine([family["base"], *adapters], device="cpu")
    b = MergeEngine([family["base"], *adapters], device="cpu", chunk_entries=64)
    a.materialize(recipe)
    b.materialize(recipe)
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "use_dora is set"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"init_lora_weights": "pissa"}, "trains on a changed base"),
    ({"r": 8}, "says r=8"),
])
def test_unsupported_adapters_are_refused_in_one_line(family, tmp_path, change, message):
    bad = _copy(family["plain"], tmp_path / "bad")
    _edit_config(bad, **change)
    with pytest.raises(AdapterError, match=message) as err:
        open_sources([family["base"], str(bad)])
    assert "\n" not in str(err.value)


def test_missing_config_absent_modules_and_other_shapes_are_refused(family, tmp_path):
    no_config = _copy(family["plain"], tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        open_sources([family["base"], str(no_config)])
    weights = load_file(f"{family['plain']}/adapter_model.safetensors")
    absent = _copy(family["plain"], tmp_path / "absent")
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in weights.items()},
              str(absent / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="target module.*absent from the base"):
        open_sources([family["base"], str(absent)])
    wide = _copy(family["plain"], tmp_path / "wide")
    save_file({k: torch.cat([v, v], 1) if k.endswith("lora_A.weight") else v for k, v in weights.items()},
              str(wide / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"delta of shape \(16, 32\), the base's weight is \(16, 16\)"):
        open_sources([family["base"], str(wide)])
    pickled = _copy(family["plain"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(weights, pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="--allow-pickle"):
        open_sources([family["base"], str(pickled)])
    opened = open_sources([family["base"], str(pickled)], allow_pickle=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(opened.checkpoints[1].get(name),
                       load_file(f"{family['plain_full']}/model.safetensors")[name])


def test_an_adapter_needs_its_base_first(family, caplog):
    with pytest.raises(RecipeError, match="needs its base model first"):
        open_sources([family["plain"], family["base"]])
    engine = MergeEngine([family["base"], family["ft"], family["plain"]], device="cpu")
    with pytest.raises(RecipeError, match="set the recipe's base"):
        engine.materialize(_recipe("task_arithmetic", family["ft"], [family["plain"]]))
    # without a base (a plain average) the adapters still sit on the engine's first model
    engine.materialize(Recipe(method="linear", sources=[{"model": family["plain"]}]))
    want = load_file(f"{family['plain_full']}/model.safetensors")
    assert all(torch.equal(engine.state_dict()[n], want[n]) for n in want)


def test_another_base_name_warns_but_merges(family, tmp_path, caplog):
    other = _copy(family["plain"], tmp_path / "other")
    _edit_config(other, base_model_name_or_path="meta-llama/Llama-3-8B")
    with caplog.at_level("WARNING", logger="evomerge.adapters"):
        open_sources([family["base"], str(other)])
    assert "names base 'meta-llama/Llama-3-8B'" in caplog.text


def test_mergekit_model_plus_lora_is_the_adapter_as_a_source(family, tmp_path):
    from evomerge.recipe.mergekit import from_mergekit

    base, lora = family["base"], family["plain"]
    recipe = from_mergekit({"merge_method": "task_arithmetic", "base_model": base,
                            "models": [{"model": f"{base}+{lora}", "parameters": {"weight": 0.5}},
                                       {"model": family["ft"], "parameters": {"weight": 0.5}}]})
    assert [s.model for s in recipe.sources] == [lora, family["ft"]]
    written = load_file(f"{stream_merge(recipe, tmp_path / 'out', device='cpu')}/model.safetensors")
    reference = _recipe("task_arithmetic", base, [family["plain_full"], family["ft"]], weight=0.5)
    want = load_file(f"{stream_merge(reference, tmp_path / 'ref', device='cpu')}/model.safetensors")
    assert all(torch.equal(written[n], want[n]) for n in want)
    with pytest.raises(RecipeError, match="is not base_model"):
        from_mergekit({"merge_method": "task_arithmetic", "base_model": base,
                       "models": [{"model": f"{family['ft']}+{lora}"}]})
    with pytest.raises(RecipeError, match="carries a LoRA adapter"):
        from_mergekit({"merge_method": "task_arithmetic", "base_model": f"{base}+{lora}", "models": [base]})


def test_gpt2_conv1d_deltas_are_transposed_as_peft_does(tmp_path):
    # GPT-2 stores its Conv1D weights [d_in, d_out]; PEFT sets fan_in_fan_out by the module type, whatever the config
    from lora_models import merged_full, save_adapter
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "base")
    adapter = save_adapter(tmp_path / "base", tmp_path / "lora", 1, r=2, lora_alpha=4, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_fc"], model_class="GPT2LMHeadModel")
    full = load_file(f"{merged_full(tmp_path / 'base', adapter, tmp_path / 'full', 'GPT2LMHeadModel')}"
                     "/model.safetensors")
    view = open_sources([str(tmp_path / "base"), str(adapter)]).checkpoints[1]
    assert view.adapter.factors["transformer.h.0.attn.c_attn.weight"].transpose
    for name, tensor in full.items():
        assert torch.equal(view.get(name), tensor), name


def test_evomerge_merge_writes_the_model_and_the_merged_adapter(family, tmp_path, capsys):
    from evomerge.cli import main

    recipe = _recipe("task_arithmetic", family["base"], [family["plain"], family["rslora"]], weight=0.5)
    recipe.to_yaml(tmp_path / "recipe.yaml")
    main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "model"), "--adapter-out",
          str(tmp_path / "adapter"), "--device", "cpu"])
    assert "merged adapter written to" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # the rank sum: q_proj 4 + 2 (both adapt it), v_proj 4, o_proj 2, gate_proj 3 (rank_pattern)
    assert config["peft_type"] == "LORA" and config["r"] == 6
    assert config["rank_pattern"][r"model\.layers\.0\.mlp\.gate_proj"] == 3
    assert config["alpha_pattern"] == config["rank_pattern"]  # scale 1 everywhere
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.gpu
def test_on_cuda_the_engine_and_the_streaming_merge_form_the_same_products(family, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sources = [family["plain"], family["rslora"], family["ft"]]
    recipe = _recipe("ties", family["base"], sources, density=0.5, weight=1.0)
    engine = MergeEngine([family["base"], *sources], device="cuda")
    engine.materialize(recipe)
    written = load_file(f"{stream_merge(recipe, tmp_path / 'out', device='cuda')}/model.safetensors")
    for name, tensor in engine.state_dict().items():
        assert torch.equal(written[name], tensor), name
