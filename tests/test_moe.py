"""Mixtures of experts from dense experts: recipes and mergekit-moe YAML, the Mixtral layout checked against a
hand-computed MoE layer, routers (seeded, scaled, mixed), dense layers, re-materialization, bad input (one line,
before loading). Parity with mergekit-moe itself: tests/test_moe_mergekit.py (marker ``mergekit``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli_errors import one_line
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from evomerge.cli import main
from evomerge.merge import merge_to_dir
from evomerge.moe import MoeError, MoeModel
from evomerge.moe.gates import (
    cheap_embed_rows,
    degenerate_layers,
    degenerate_warning,
    most_alike,
    random_rows,
    tokenize_prompts,
)
from evomerge.recipe import MoeRecipe, RecipeError, load_recipe
from evomerge.recipe.moe import from_mergekit_moe, to_mergekit_moe, to_mergekit_moe_yaml

MLP = ("gate_proj", "up_proj", "down_proj")


def moe(base: str, experts: list[str | dict], **kwargs: object) -> MoeRecipe:
    """An MoE recipe with random gates unless told otherwise; an expert is a path or a mapping."""
    return MoeRecipe(base=base, experts=[e if isinstance(e, dict) else {"model": e} for e in experts],
                     gate_mode=kwargs.pop("gate_mode", "random"), **kwargs)


def dense_mlp(x: torch.Tensor, weights: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """A Llama MLP by its formula: down(silu(gate x) * up x)."""
    gate, up, down = (weights[f"model.layers.{layer}.mlp.{p}.weight"] for p in MLP)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


# ------------------------------------------------------------------------------------------------ recipes
MERGEKIT = {"base_model": "/m/base", "gate_mode": "cheap_embed", "experts_per_token": 1, "dtype": "bfloat16",
            "experts": [{"source_model": "/m/a", "positive_prompts": ["x"], "negative_prompts": ["y"]},
                        {"source_model": "/m/b", "positive_prompts": ["z"], "residual_scale": 0.5}]}


def test_mergekit_moe_yaml_imports_and_exports_with_its_meaning(tmp_path: Path) -> None:
    recipe = from_mergekit_moe(MERGEKIT)
    assert recipe.base == "/m/base" and recipe.gate_mode == "cheap_embed" and recipe.experts_per_token == 1
    assert [e.model for e in recipe.experts] == ["/m/a", "/m/b"]
    assert recipe.experts[0].negative_prompts == ["y"] and recipe.experts[1].residual_scale == 0.5
    assert to_mergekit_moe(recipe) == MERGEKIT
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(MERGEKIT))  # the file mergekit-moe reads
    assert load_recipe(tmp_path / "mk.yml") == recipe
    (tmp_path / "ours.yml").write_text(recipe.to_yaml())  # evomerge's own form: kind: moe
    assert yaml.safe_load(recipe.to_yaml())["kind"] == "moe" and load_recipe(tmp_path / "ours.yml") == recipe
    defaults = from_mergekit_moe({"base_model": "b", "experts": [{"source_model": "a", "positive_prompts": ["p"]}] * 2})
    assert (defaults.gate_mode, defaults.experts_per_token) == ("hidden", 2)  # mergekit-moe's defaults
    assert "--random-seed 3" in to_mergekit_moe_yaml(moe("b", ["a", "c"], seed=3))


@pytest.mark.parametrize(("data", "message"), [
    ({**MERGEKIT, "experts": [{"source_model": "/m/a", "noise_scale": 0.1}]}, "noise_scale adds unseeded"),
    ({**MERGEKIT, "tokenizer_source": "base"}, "unsupported key(s) ['tokenizer_source']"),
    ({**MERGEKIT, "architecture": "qwen"}, "Qwen2MoeForCausalLM has exactly one shared expert, the recipe lists 0"),
    ({**MERGEKIT, "architecture": "deepseek"}, "evomerge writes 'mixtral' (MixtralForCausalLM) and 'qwen'"),
    ({**MERGEKIT, "experts_per_token": 3}, "experts_per_token is 3 but there are only 2 experts"),
    ({**MERGEKIT, "gate_mode": "hidden", "experts": [{"source_model": "/m/a"}, {"source_model": "/m/b"}]},
     "experts [0, 1] have an empty positive_prompts list"),
])
def test_bad_mergekit_moe_configs_are_one_line(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        from_mergekit_moe(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_keys_mergekit_moe_lacks_are_not_exported_and_a_misspelt_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"\['router_scale', 'dense_layers'\], which mergekit-moe has no key for"):
        to_mergekit_moe(moe("b", ["a", "c"], router_scale=2.0, dense_layers={"layers": [0]}))
    (tmp_path / "r.yml").write_text("kind: moe\nbase: b\nexperts: [{model: a}]\ngate_mod: random\n")
    with pytest.raises(RecipeError, match="unknown key 'gate_mod' \\(did you mean 'gate_mode'\\?\\)"):
        load_recipe(tmp_path / "r.yml")


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama of 3 layers (another shape) and a tiny Qwen2 (another architecture, no upstream Mixtral)."""
    root = tmp_path_factory.mktemp("odd")
    save_tiny(root / "deep", 7, num_layers=3)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "qwen")
    return {"deep": str(root / "deep"), "qwen": str(root / "qwen")}


def test_bad_models_are_refused_from_headers_before_loading(tiny_llamas: list[str], odd_models: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base, a, b, _ = tiny_llamas
    cases = [
        (moe(base, [a, odd_models["deep"]]), "expert 1 (", "has 3 layers, the base 2"),
        (moe(base, [a, odd_models["qwen"]]), "is a 'qwen2' model, the base", "fine-tune of the base's architecture"),
        (moe(odd_models["qwen"], [odd_models["qwen"]] * 2), "is a 'qwen2' model; MixtralForCausalLM is built from",
         "architecture: qwen2_moe"),
        (moe(base, [{"model": a, "positive_prompts": ["x"]}, {"model": b, "positive_prompts": ["y"]}],
             gate_mode="hidden"),
         "tokenizes the prompts with the base's tokenizer", "gate_mode 'random'"),
    ]
    monkeypatch.setattr(torch.nn.Module, "to", lambda *_: pytest.fail("a model was built"))
    for recipe, *messages in cases:
        with pytest.raises(MoeError) as err:
            MoeModel(recipe)
        assert all(m in str(err.value) for m in messages) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(MoeError, match="names layer 2, but the base has 2 layers"):
        MoeModel(moe(base, [a, b], dense_layers={"layers": [1, 2]}))
    with pytest.raises(ValueError, match="unknown merge method"):
        MoeModel(moe(base, [a, b], dense_layers={"layers": [1], "method": "tees"}))


def test_cli_merge_of_a_bad_moe_config_is_one_line(tiny_llamas: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base, a, b, _ = tiny_llamas
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump({"base_model": base, "gate_mode": "hidden", "experts_per_token": 2,
                                      "experts": [{"source_model": a, "positive_prompts": ["x"]},
                                                  {"source_model": b, "positive_prompts": []}]}))
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "experts [1] have an empty positive_prompts list" in one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_merged_moe_dir_says_how_it_was_made_and_its_recipe_rebuilds_it(tiny_llamas: list[str], tmp_path: Path) -> None:
    """``evomerge merge`` of an MoE recipe writes what every merged dir gets (:mod:`evomerge.modelcard`): the card,
    ``recipe.yaml`` (which rebuilds the dir bit for bit), mergekit-moe's config when mergekit-moe can build it."""
    base, *experts = tiny_llamas
    recipe = moe(base, experts, experts_per_token=1, seed=4)
    out = tmp_path / "moe"
    assert main(["merge", str(_write(tmp_path / "r.yml", recipe)), "--out", str(out), "--device", "cpu"]) == 0
    card = (out / "README.md").read_text()
    assert "tags:\n- merge\n- evomerge\n- moe\n- mergekit\n" in card and "1 of 3 experts per token" in card
    assert (out / "mergekit_moe_config.yml").read_text() == to_mergekit_moe_yaml(recipe)
    assert load_recipe(out / "recipe.yaml") == recipe
    again = merge_to_dir(load_recipe(out / "recipe.yaml"), tmp_path / "again", device="cpu")
    assert all(torch.equal(t, load_file(again / "model.safetensors")[n])
               for n, t in load_file(out / "model.safetensors").items())
    searched = merge_to_dir(recipe.model_copy(update={"router_scale": 2.0}), tmp_path / "searched", device="cpu")
    assert not (searched / "mergekit_moe_config.yml").exists()  # mergekit-moe has no router scale
    assert "mergekit" not in (searched / "README.md").read_text().split("---")[1]


def _write(path: Path, recipe: MoeRecipe) -> Path:
    path.write_text(recipe.to_yaml())
    return path


# ------------------------------------------------------------------------------------- layout and maths
def test_mixtral_layer_is_the_top_k_mixture_of_the_experts_mlps(tiny_llamas: list[str], tmp_path: Path) -> None:
    base, *experts = tiny_llamas
    out = merge_to_dir(moe(base, experts, experts_per_token=2, seed=5), tmp_path / "moe", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    weights = [load_file(f"{p}/model.safetensors") for p in tiny_llamas]
    saved = load_file(out / "model.safetensors")
    for name, tensor in weights[0].items():  # attention, norms, embeddings, head: the base's
        if ".mlp." not in name:
            assert torch.equal(saved[name], tensor), name
    router = saved["model.layers.1.mlp.gate.weight"]
    assert torch.equal(router, random_rows(5, (2, 3, 16))[1])  # mergekit-moe --random-seed 5 draws these
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(x @ router.T, dim=-1)
    top, index = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    expected = torch.stack([sum(top[t, k] * dense_mlp(x[t], weights[1 + int(index[t, k])], 1) for k in range(2))
                            for t in range(7)])
    with torch.no_grad():
        got = model.model.layers[1].mlp(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_router_scale_and_random_weight_are_the_formula(tiny_llamas: list[str]) -> None:
    base, *experts = tiny_llamas
    live = MoeModel(moe(base, experts, seed=2), device="cpu")
    plain = {i: layer.mlp.gate.weight.clone() for i, layer in enumerate(live.model.model.layers)}
    live.materialize(moe(base, experts, seed=2, router_scale=[0.5, 3.0], random_weight=0.25))
    noise = random_rows(3, (2, 3, 16))  # seed + 1
    noise = noise / noise.norm(dim=-1, keepdim=True)
    for i, scale in enumerate([0.5, 3.0]):
        expected = scale * (0.75 * plain[i] + 0.25 * noise[i])
        torch.testing.assert_close(live.model.model.layers[i].mlp.gate.weight, expected, rtol=0, atol=1e-6)


def test_dense_layers_hold_the_merged_mlp_in_every_expert_slot(tiny_llamas: list[str]) -> None:
    base, *experts = tiny_llamas
    weights = [load_file(f"{p}/model.safetensors") for p in experts]
    live = MoeModel(moe(base, experts, dense_layers={"layers": [0], "method": "linear"}), device="cpu")
    mean = {n: sum(w[n] for w in weights) / 3 for n in weights[0] if ".mlp." in n}  # linear, equal weights
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = live.model.model.layers[0].mlp(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, dense_mlp(x, mean, 0), rtol=1e-5, atol=1e-6)
    experts1 = live.model.model.layers[1].mlp.experts.down_proj  # layer 1 stays a mixture of the experts' own MLPs
    assert all(torch.equal(experts1[e], weights[e]["model.layers.1.mlp.down_proj.weight"]) for e in range(3))


def test_rematerialized_live_model_equals_a_fresh_build(tiny_llamas: list[str]) -> None:
    base, *experts = tiny_llamas
    first = moe(base, experts, experts_per_token=1, dense_layers={"layers": [1], "method": "ties",
                                                                  "parameters": {"density": 0.5}})
    second = moe(base, [{"model": e, "residual_scale": 0.5} for e in experts], experts_per_token=3, router_scale=2.0)
    live = MoeModel(first, device="cpu")
    assert live.materialize(second) == [0, 1]  # residual_scale changes both layers
    assert live.materialize(first) == [0, 1] and live.materialize(first) == []
    fresh = MoeModel(first, device="cpu").state_dict()
    again = live.state_dict()
    assert all(torch.equal(fresh[n], again[n]) for n in fresh)
    assert all(layer.mlp.gate.top_k == 1 for layer in live.model.model.layers)


def test_cheap_embed_rows_are_the_normalised_sum_of_token_embeddings(mini_zoo) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mini_zoo.base)
    embed = load_file(f"{mini_zoo.base}/model.safetensors")["model.embed_tokens.weight"]
    prompts = ["REV:ab=", "SORT:dcba="]
    rows = cheap_embed_rows(embed, tokenize_prompts(tokenizer, prompts), num_layers=2)
    ids = [tokenizer.bos_token_id, *tokenizer("REV:ab=", add_special_tokens=False)["input_ids"],
           tokenizer.bos_token_id, *tokenizer("SORT:dcba=", add_special_tokens=False)["input_ids"]]
    total = sum(embed[i] for i in ids)
    torch.testing.assert_close(rows, (total / total.norm()).repeat(2, 1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- degenerate gates
def test_degenerate_router_rows_follow_mergekits_condition_number_rule() -> None:
    """A layer is degenerate when its (experts, hidden) gate rows have a 2-norm condition number above 5 (mergekit-moe's
    warn_degenerate_gates): the singular values here are hand-computed."""
    rows = torch.zeros(4, 3, 4)
    rows[0] = torch.eye(3, 4)  # orthonormal rows: σ = (1, 1, 1), condition 1
    rows[1, :, :3] = torch.diag(torch.tensor([1.0, 0.5, 0.25]))  # σ = (1, 0.5, 0.25): condition 4, not above 5
    rows[2, :, :3] = torch.diag(torch.tensor([1.0, 0.5, 0.125]))  # condition 8
    rows[3] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.1, 0, 0]])  # rows 0 and 2 nearly the same
    assert degenerate_layers(rows) == [2, 3]
    i, j, cosine = most_alike(rows, [3])
    assert (i, j) == (0, 2) and cosine == pytest.approx(1 / 1.01**0.5)
    message = degenerate_warning(rows, ["a", "b", "c"])
    assert message is not None and "layers 2, 3" in message and "the most alike are a and c" in message
    assert degenerate_warning(rows[:2], ["a", "b", "c"]) is None


def test_experts_with_the_same_prompts_are_named_in_one_warning_once(mini_zoo, caplog) -> None:  # noqa: ANN001
    experts = [str(p) for p in mini_zoo.experts.values()][:3]
    prompts = [["REV:ab=", "REV:cd="], ["SORT:ba=", "SORT:dc="], ["REV:ab=", "REV:cd="]]  # experts 0 and 2 alike
    recipe = MoeRecipe(base=str(mini_zoo.base), gate_mode="cheap_embed",
                       experts=[{"model": e, "positive_prompts": p} for e, p in zip(experts, prompts)])
    with caplog.at_level("WARNING", logger="evomerge.moe"):
        live = MoeModel(recipe, device="cpu")
        live.materialize(recipe.model_copy(update={"router_scale": 2.0}))  # the same gate rows: not warned again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    names = [Path(e).name for e in experts]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert (f"the router rows of every layer are nearly linearly dependent (condition number above 5, mergekit-moe's "
            f"rule); the most alike are expert 0 ({names[0]}) and expert 2 ({names[2]}) (cosine 1.000)") in warnings[0]
