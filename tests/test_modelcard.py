"""Merged dirs say how they were made: model card, recipes, generation config (eos lists kept), safetensors metadata;
transformers loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import tiny_family
from transformers import AutoModelForCausalLM, GenerationConfig

from evomerge import __version__
from evomerge.engine.streaming import stream_merge
from evomerge.merge import merge_to_dir
from evomerge.modelcard import (
    GENERATION_CONFIG,
    SplitScores,
    generation_config_source,
    hub_id,
    model_card,
    provenance,
)
from evomerge.recipe import Recipe, StackRecipe, load_recipe
from evomerge.recipe.mergekit import from_mergekit

# a chat model's generation config: several end-of-turn tokens and sampling defaults
CHAT_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    base, fts = tiny_family(tmp_path_factory.mktemp("card-family"), n=2)
    for path in (base, *fts):
        (path / GENERATION_CONFIG).unlink(missing_ok=True)
    (fts[0] / GENERATION_CONFIG).write_text(json.dumps(CHAT_GENERATION, indent=2))
    return base, fts


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def ties(base: Path, fts: list[Path]) -> Recipe:
    return Recipe(method="ties", base=str(base), parameters={"density": 0.5},
                  sources=[{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, (0.7, 0.3))])


@pytest.mark.parametrize("shard", [None, 4096])
def test_merged_dir_carries_card_recipes_generation_config_and_metadata(family, tmp_path: Path, shard) -> None:
    base, fts = family
    recipe = ties(base, fts)
    out = merge_to_dir(recipe, tmp_path / "merged", device="cpu", **({"max_shard_size": shard} if shard else {}))

    # generation config: the base has none, the first source that has one gives it verbatim (the eos list kept)
    assert json.loads((out / GENERATION_CONFIG).read_text()) == CHAT_GENERATION
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == [2, 7] and GenerationConfig.from_pretrained(out).top_p == 0.9
    # the recipe files rebuild the same recipe; the mergekit one reads back as the same merge
    assert load_recipe(out / "recipe.yaml") == recipe
    mk = from_mergekit(yaml.safe_load((out / "mergekit_config.yml").read_text()))
    assert (mk.method, mk.base, [s.model for s in mk.sources]) == ("ties", str(base), [str(p) for p in fts])
    # the model card: HF front matter, the sources with their weights, the evomerge version, both YAML blocks
    card = (out / "README.md").read_text()
    # local paths, not Hub ids: no base_model (the Hub would take them for repo ids), listed in the body instead
    assert front_matter(card) == {"library_name": "transformers", "tags": ["merge", "evomerge", "mergekit"]}
    assert f"so not in `base_model`): `{base}`, `{fts[0]}`, `{fts[1]}`." in card
    assert f"evomerge {__version__}, method `ties`" in card
    assert f'- `{fts[0]}`: `{{"weight": 0.7}}`' in card and f"- `{base}` (base" in card
    assert card.count("```yaml") == 2 and "## Scores" not in card  # not from a search: no scores
    # every shard names the recipe in its header, beside transformers' format key
    files = sorted(out.glob("*.safetensors"))
    assert (len(files) > 1) == (shard is not None)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and meta["evomerge_version"] == __version__
        assert Recipe.model_validate_json(meta["evomerge_recipe"]) == recipe
    # what transformers loads is the merge: the tensors of a bare export (no provenance: weights and config only)
    bare = stream_merge(recipe, tmp_path / "bare", device="cpu")
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(bare).state_dict()
    assert reloaded.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


def test_generation_config_comes_from_the_base_first(family, tmp_path: Path) -> None:
    base, fts = family
    assert generation_config_source(ties(base, fts)) == fts[0]  # the base has none
    with_base = tmp_path / "base"
    with_base.mkdir()
    (with_base / GENERATION_CONFIG).write_text("{}")
    assert generation_config_source(Recipe(method="linear", base=str(with_base), sources=[{"model": str(fts[0])}])) \
        == with_base
    assert generation_config_source(Recipe(method="linear", sources=[{"model": str(fts[1])}])) is None


def test_card_of_a_search_shows_validation_and_test_scores_with_stderr(family) -> None:
    base, fts = family
    scores = [SplitScores("validation", {"add/acc": 0.81234, "mul/acc": 0.5}),
              SplitScores("test", {"add/acc": 0.79, "mul/acc": 0.4567}, {"add/acc": 0.0213})]
    card = model_card(ties(base, fts), name="best_model", scores=scores, origin="Found by `evomerge search`.")
    assert "| metric | validation | test |" in card
    assert "| add/acc | 0.812 | 0.790 ± 0.021 |" in card and "| mul/acc | 0.500 | 0.457 |" in card
    assert "Found by `evomerge search`." in card


def test_data_aware_methods_have_no_mergekit_files(family) -> None:
    base, fts = family
    recipe = Recipe(method="fisher", sources=[{"model": str(p)} for p in fts])
    files = provenance(recipe, name="m").files
    assert "mergekit_config.yml" not in files and "```yaml" in files["README.md"]
    assert files["README.md"].count("```yaml") == 1 and "mergekit" not in front_matter(files["README.md"])["tags"]


def test_passthrough_card_lists_the_layer_slices(family) -> None:
    base, fts = family
    recipe = StackRecipe(slices=[{"model": str(base), "layer_range": [0, 2]},
                                                  {"model": str(fts[1]), "layer_range": [1, 2], "scale": 0.5}])
    files = provenance(recipe, name="stack").files
    assert f"- `{base}` layers 0-1\n- `{fts[1]}` layers 1-1, scaled by 0.5" in files["README.md"]
    assert yaml.safe_load(files["mergekit_config.yml"])["merge_method"] == "passthrough"


@pytest.mark.parametrize(("model", "want"), [
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    ("/hf/hub/models--Qwen--Qwen2.5-0.5B/snapshots/1a2b3c", "Qwen/Qwen2.5-0.5B"),  # huggingface_hub's cache
    ("/hf/hub/models--gpt2/snapshots/1a2b3c/", "gpt2"),
    ("/models/llama", None), ("./llama", None), ("~/m/llama", None), ("base", None), ("a/b/c", None),
    ("org/-name", None), ("org/na--me", None), ("org/na..me", None), ("org/name.", None),
])
def test_hub_ids_are_told_from_local_paths(model: str, want: str | None) -> None:
    assert hub_id(model) == want


def test_card_lists_hub_ids_under_base_model_and_local_paths_in_the_body() -> None:
    cached = "/hf/hub/models--org--expert/snapshots/abc"
    recipe = Recipe(method="task_arithmetic", base="meta-llama/Llama-3.1-8B",
                    sources=[{"model": "/work/ft-math"}, {"model": cached}, {"model": "meta-llama/Llama-3.1-8B"}])
    card = model_card(recipe, name="m")
    assert front_matter(card)["base_model"] == ["meta-llama/Llama-3.1-8B", "org/expert"]  # once each, base first
    assert "not in `base_model`): `/work/ft-math`." in card
    hub_only = model_card(Recipe(method="linear", sources=[{"model": "a/one"}, {"model": "b/two"}]), name="m")
    assert front_matter(hub_only)["base_model"] == ["a/one", "b/two"] and "Local models" not in hub_only
