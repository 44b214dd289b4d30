"""Qwen2-MoE output (``architecture: qwen2_moe``, one shared expert): the layout checked tensor by tensor against
the sources and a hand-computed MoE layer, the shared expert's gate rows computed independently from its prompts,
re-materialization, a search over a Qwen2-MoE template, mergekit-moe YAML with ``architecture`` and
``shared_experts``, and bad combinations (one line). Parity with mergekit-moe itself: tests/test_moe_mergekit.py."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from evomerge.merge import merge_to_dir
from evomerge.moe import MoeError, MoeModel
from evomerge.moe.gates import random_rows
from evomerge.recipe import MoeRecipe, RecipeError, load_recipe, parse_recipe
from evomerge.recipe.moe import from_mergekit_moe, mergekit_moe_exportable, to_mergekit_moe
from evomerge.search.config import RunConfig
from evomerge.search.study import run_search

MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION_BIASES = ("q_proj", "k_proj", "v_proj")


def qwen(base: str, experts: list[str], shared: str, **kwargs: object) -> MoeRecipe:
    """A Qwen2-MoE recipe (random gates unless told otherwise) with ``shared`` as its shared expert."""
    shared_expert = kwargs.pop("shared_expert", {})
    return MoeRecipe(base=base, experts=[{"model": e} for e in experts], gate_mode=kwargs.pop("gate_mode", "random"),
                     shared_experts=[{"model": shared, **shared_expert}], **kwargs)


def mlp(x: torch.Tensor, weights: dict[str, torch.Tensor], layer: int, scale: float = 1.0) -> torch.Tensor:
    """A Llama MLP by its formula: down(silu(gate x) * up x), down scaled by ``scale``."""
    gate, up, down = (weights[f"model.layers.{layer}.mlp.{p}.weight"] for p in MLP)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ (down * scale).T


def test_qwen2_moe_holds_the_sources_tensors_zero_biases_and_the_seeded_gates(tiny_llamas: list[str],
                                                                           tmp_path: Path) -> None:
    base, *experts = tiny_llamas
    recipe = qwen(base, experts[:2], experts[2], shared_expert={"residual_scale": 0.5}, experts_per_token=1, seed=7)
    assert recipe.output_architecture == "qwen2_moe"  # the default with a shared expert
    out = merge_to_dir(recipe, tmp_path / "moe", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out)  # trust_remote_code off: an upstream class
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    config = model.config
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob, config.decoder_sparse_step) == \
        (2, 1, True, 1)
    assert config.shared_expert_intermediate_size == config.moe_intermediate_size == 32  # the base's MLP size
    weights = [load_file(f"{p}/model.safetensors") for p in tiny_llamas]
    saved = load_file(out / "model.safetensors")
    for name, tensor in weights[0].items():  # attention, norms, embeddings, head: the base's
        if ".mlp." not in name:
            assert torch.equal(saved[name], tensor), name
    draw = random_rows(7, (2, 3, 16))  # mergekit-moe draws the experts' and the shared expert's rows together
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        for part in ATTENTION_BIASES:  # Qwen2-MoE's attention biases; the Llama base has none: zeros
            bias = saved[f"{prefix}.self_attn.{part}.bias"]
            assert bias.shape == (saved[f"{prefix}.self_attn.{part}.weight"].shape[0],) and not bias.any()
        assert torch.equal(saved[f"{prefix}.mlp.gate.weight"], draw[layer, :2])
        assert torch.equal(saved[f"{prefix}.mlp.shared_expert_gate.weight"], draw[layer, 2:])
        for e in range(2):
            source = weights[1 + e]
            gate_up = torch.cat([source[f"{prefix}.mlp.gate_proj.weight"], source[f"{prefix}.mlp.up_proj.weight"]])
            assert torch.equal(saved[f"{prefix}.mlp.experts.gate_up_proj"][e], gate_up)
            assert torch.equal(saved[f"{prefix}.mlp.experts.down_proj"][e], source[f"{prefix}.mlp.down_proj.weight"])
        shared = weights[3]
        for part in ("gate_proj", "up_proj"):
            assert torch.equal(saved[f"{prefix}.mlp.shared_expert.{part}.weight"],
                               shared[f"{prefix}.mlp.{part}.weight"])
        assert torch.equal(saved[f"{prefix}.mlp.shared_expert.down_proj.weight"],
                           shared[f"{prefix}.mlp.down_proj.weight"] * 0.5)  # residual_scale, as for an expert

    # the layer: the top-k mixture of the experts' MLPs plus the shared MLP times sigmoid(x · shared gate row)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    router, shared_gate = draw[1, :2], draw[1, 2]
    index = (x @ router.T).argmax(dim=-1)  # top 1; its renormalised weight is 1
    expected = torch.stack([mlp(x[t], weights[1 + int(index[t])], 1) for t in range(6)]) + \
        torch.sigmoid(x @ shared_gate).unsqueeze(-1) * mlp(x, weights[3], 1, scale=0.5)
    with torch.no_grad():
        got = model.model.layers[1].mlp(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_shared_experts_gate_row_comes_from_its_prompts(mini_zoo) -> None:  # noqa: ANN001
    """cheap_embed: the shared expert's gate row is the normalised sum of its prompts' token embeddings (BOS-prefixed,
    no padding counted), computed here from the tokenizer and the embedding table."""
    experts = [str(p) for p in mini_zoo.experts.values()][:2]
    prompts = ["REV:ab=", "SORT:dcba="]
    recipe = MoeRecipe(base=str(mini_zoo.base), gate_mode="cheap_embed",
                       experts=[{"model": e, "positive_prompts": [p]} for e, p in zip(experts, ["ROT:a=", "SHIFT:c="])],
                       shared_experts=[{"model": str(mini_zoo.base), "positive_prompts": prompts}])
    live = MoeModel(recipe, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(mini_zoo.base)
    embed = load_file(f"{mini_zoo.base}/model.safetensors")["model.embed_tokens.weight"]
    ids = [i for p in prompts for i in [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]]
    total = sum(embed[i] for i in ids)
    for layer in live.model.model.layers:
        torch.testing.assert_close(layer.mlp.shared_expert_gate.weight[0], total / total.norm(), rtol=1e-5, atol=1e-6)
        assert not any(torch.equal(layer.mlp.gate.weight[e], layer.mlp.shared_expert_gate.weight[0]) for e in range(2))


def test_rematerialized_qwen2_moe_equals_a_fresh_build(tiny_llamas: list[str]) -> None:
    base, a, b, c = tiny_llamas
    first = qwen(base, [a, b], c, seed=1, dense_layers={"layers": [0], "method": "linear"})
    second = qwen(base, [a, b], c, seed=2, shared_expert={"residual_scale": 0.25}, experts_per_token=1,
                  router_scale=3.0)
    live = MoeModel(first, device="cpu")
    assert live.materialize(second) == [0, 1]  # the shared expert's residual_scale changes both layers
    assert live.materialize(first) == [1]  # layer 0's plain MLP still holds first's dense merge
    assert live.materialize(first) == []
    fresh = MoeModel(first, device="cpu").state_dict()
    again = live.state_dict()
    assert fresh.keys() == again.keys() and all(torch.equal(fresh[n], again[n]) for n in fresh)
    with pytest.raises(MoeError, match="built from base .* shared experts"):
        live.materialize(qwen(base, [a, b], a))


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A tiny Qwen2 (q/k/v biases) and two fine-tunes of it (its biases and MLPs moved by seeded noise)."""
    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(root / "base")
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(root / f"ft{i}")
    return [str(root / n) for n in ("base", "ft0", "ft1")]


def test_a_qwen2_base_becomes_qwen2_moe_with_its_own_attention_biases(tiny_qwen: list[str], tmp_path: Path) -> None:
    base, a, b = tiny_qwen
    with pytest.raises(MoeError, match="is a 'qwen2' model; MixtralForCausalLM is built from llama / mistral bases: "
                                       r"write it as Qwen2MoeForCausalLM \(architecture: qwen2_moe, one shared"):
        MoeModel(MoeRecipe(base=base, experts=[{"model": a}, {"model": b}], gate_mode="random"))
    out = merge_to_dir(qwen(base, [a, b], base, seed=3), tmp_path / "moe", device="cpu")
    saved, source = load_file(out / "model.safetensors"), load_file(f"{base}/model.safetensors")
    biases = [n for n in source if n.endswith("_proj.bias")]
    assert len(biases) == 6 and all(torch.equal(saved[n], source[n]) for n in biases)
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen2MoeForCausalLM"


@pytest.mark.parametrize(("fields", "message"), [
    ({"architecture": "qwen2_moe"}, "Qwen2MoeForCausalLM has exactly one shared expert, the recipe lists 0"),
    ({"shared_experts": [{"model": "s"}, {"model": "t"}]}, "exactly one shared expert, the recipe lists 2"),
    ({"architecture": "mixtral", "shared_experts": [{"model": "s"}]},
     "MixtralForCausalLM has no shared expert; remove shared_experts, or set architecture: qwen2_moe"),
    ({"gate_mode": "hidden", "shared_experts": [{"model": "s"}]},
     "initialises the shared expert's gate from its prompts (as mergekit-moe does), but shared_experts[0] has no "
     "positive_prompts"),
    ({"architecture": "deepseek"}, "architecture: Input should be 'mixtral' or 'qwen2_moe'"),
])
def test_impossible_architecture_and_shared_expert_combinations_are_one_line(tmp_path: Path, fields: dict,
                                                                             message: str) -> None:
    data = {"kind": "moe", "base": "b", "gate_mode": "random", "experts": [{"model": "a", "positive_prompts": ["p"]},
                                                                           {"model": "c", "positive_prompts": ["q"]}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump({**data, **fields}))
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "r.yml")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_mergekit_moe_yaml_carries_architecture_and_the_shared_expert() -> None:
    config = {"base_model": "/m/base", "gate_mode": "hidden", "experts_per_token": 1, "architecture": "qwen",
              "experts": [{"source_model": "/m/a", "positive_prompts": ["x"]},
                          {"source_model": "/m/b", "positive_prompts": ["y"]}],
              "shared_experts": [{"source_model": "/m/base", "positive_prompts": ["z"], "residual_scale": 0.5}]}
    recipe = from_mergekit_moe(config)
    assert recipe.architecture == "qwen2_moe" and recipe.shared_experts[0].residual_scale == 0.5
    assert to_mergekit_moe(recipe) == config
    # without 'architecture' a shared expert means Qwen2-MoE; the export names it (mergekit-moe could pick DeepSeek)
    implicit = from_mergekit_moe({k: v for k, v in config.items() if k != "architecture"})
    assert implicit.architecture is None and implicit.output_architecture == "qwen2_moe"
    assert to_mergekit_moe(implicit)["architecture"] == "qwen"
    assert parse_recipe(yaml.safe_load(implicit.to_yaml())) == implicit
    # mergekit-moe reads a shared expert only from the base or an expert model
    elsewhere = recipe.model_copy(update={"shared_experts": [recipe.shared_experts[0].model_copy(
        update={"model": "/m/other"})]})
    assert not mergekit_moe_exportable(elsewhere)
    with pytest.raises(RecipeError, match=r"shared_experts\[0\] \(a model other than the base and the experts\)"):
        to_mergekit_moe(elsewhere)
    for arch, message in [("deepseek", "evomerge writes 'mixtral' (MixtralForCausalLM) and 'qwen'"),
                          (None, "mergekit-moe builds a DeepSeek MoE, which evomerge does not write")]:
        shared = [{"source_model": "/m/base"}]  # no prompts: mergekit-moe's DeepSeek-MoE without 'architecture'
        with pytest.raises(RecipeError, match=re.escape(message)):
            from_mergekit_moe({**config, "gate_mode": "random", "shared_experts": shared, "architecture": arch})


def test_evomerge_search_rematerializes_a_qwen2_moe_template(tiny_llamas: list[str], tmp_path: Path) -> None:
    base, a, b, c = tiny_llamas
    (tmp_path / "template.yaml").write_text(qwen(base, [a, b], c).to_yaml())
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"kind": "moe", "router_scale": {"low": 0.5, "high": 2.0},
                                                         "experts_per_token": {"choice": [1, 2]},
                                                         "dense": {"choice": [False, True]}}))
    config = RunConfig(name="q", template=str(tmp_path / "template.yaml"), space=str(tmp_path / "space.yaml"),
                       evaluator={"type": "callable", "function": "search_fitness:norm_sum"}, n_trials=3,
                       out=str(tmp_path / "run"), device="cpu", seed=1)
    run_search(config, progress=False)
    study = optuna.load_study(study_name="q", storage=config.storage_url)
    recipes = [parse_recipe(t.user_attrs["recipe"]) for t in study.get_trials()]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 4
    assert all(isinstance(r, MoeRecipe) and r.output_architecture == "qwen2_moe" and r.shared_experts[0].model == c
               for r in recipes)
    best = parse_recipe(study.best_trial.user_attrs["recipe"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best_model").state_dict()
    fresh = MoeModel(best, device="cpu").state_dict()  # the live model, re-materialized per trial, exported the best
    assert fresh.keys() == exported.keys() and all(torch.equal(fresh[n], exported[n]) for n in fresh)


def test_dense_layers_of_a_qwen2_moe_are_plain_mlps_that_cost_one_mlp(tiny_llamas: list[str], tmp_path: Path) -> None:
    """A dense layer of a Qwen2-MoE is ``mlp_only_layers``: the merged MLP alone (here linear, equal weights: the
    experts' mean), without router, routed experts or shared expert; the written model is smaller by exactly those."""
    base, a, b, c = tiny_llamas
    recipe = qwen(base, [a, b], c, seed=1, dense_layers={"layers": [0], "method": "linear"})
    out = merge_to_dir(recipe, tmp_path / "dense", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.mlp_only_layers == [0]
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock"]
    saved = load_file(out / "model.safetensors")
    weights = [load_file(f"{p}/model.safetensors") for p in (a, b)]
    assert sorted(n for n in saved if n.startswith("model.layers.0.mlp.")) == \
        [f"model.layers.0.mlp.{part}.weight" for part in ("down_proj", "gate_proj", "up_proj")]
    for part in MLP:
        name = f"model.layers.0.mlp.{part}.weight"
        torch.testing.assert_close(saved[name], (weights[0][name] + weights[1][name]) / 2, rtol=0, atol=1e-7)
    sparse = merge_to_dir(recipe.model_copy(update={"dense_layers": None}), tmp_path / "sparse", device="cpu")
    hidden, inter, experts = 16, 32, 2

    def count(path: Path) -> int:
        return sum(t.numel() for t in load_file(path / "model.safetensors").values())

    # the MoE block: the experts' MLPs and router rows, the shared MLP and its gate row; the plain layer: one MLP
    block = experts * 3 * hidden * inter + experts * hidden + 3 * hidden * inter + hidden
    assert count(sparse) - count(out) == block - 3 * hidden * inter
