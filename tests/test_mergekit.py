"""mergekit YAML import/export: meaning preserved, unsupported keys refused."""

from __future__ import annotations

import logging

import pytest
import yaml

from evomerge.merge import check_values
from evomerge.recipe import Recipe, RecipeError, load_recipe
from evomerge.recipe.mergekit import from_mergekit, to_mergekit

TIES = """
merge_method: ties
base_model: /m/base
models:
  - model: /m/base
  - model: /m/a
    parameters:
      density: [0.2, 0.8]
      weight:
        - filter: self_attn
          value: [0.0, 0.5, 1.0]
        - filter: mlp
          value: 0.3
        - value: 0.7
  - model: /m/b
    parameters: {density: 0.5, weight: 0.5}
parameters:
  normalize: true
  lambda: 0.9
dtype: bfloat16
tokenizer_source: base
"""


def test_ties_import():
    recipe = from_mergekit(yaml.safe_load(TIES))
    assert recipe.method == "ties" and recipe.base == "/m/base" and recipe.dtype == "bfloat16"
    assert [s.model for s in recipe.sources] == ["/m/a", "/m/b"]  # the bare base entry is not a source
    assert recipe.sources[0].parameters["weight"] == {"self_attn": [0.0, 0.5, 1.0], "mlp": 0.3, "default": 0.7}
    assert recipe.sources[0].parameters["density"] == [0.2, 0.8]
    assert recipe.parameters == {"normalize": True, "lambda": 0.9}
    assert recipe.tokenizer_source == "/m/base"


def test_round_trip_preserves_meaning(tmp_path):
    recipe = from_mergekit(yaml.safe_load(TIES))
    exported = to_mergekit(recipe)
    assert exported["models"][0]["parameters"]["weight"] == [
        {"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.7}]
    assert exported["tokenizer_source"] == "base"
    assert from_mergekit(exported) == recipe
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(exported))
    assert load_recipe(path) == recipe  # the file reader detects mergekit configs


def test_slerp_base_is_t0_endpoint():
    data = {"merge_method": "slerp", "base_model": "A",
            "slices": [{"sources": [{"model": "A", "layer_range": [0, 4]}, {"model": "B", "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]}}
    recipe = from_mergekit(data)
    assert [s.model for s in recipe.sources] == ["A", "B"]
    assert recipe.parameters["t"] == {"mlp": [0, 1], "default": 0.5}
    back = to_mergekit(recipe)
    assert back["base_model"] == "A" and from_mergekit(back) == recipe


def test_passthrough_slices():
    data = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 3]}]},
        {"sources": [{"model": "B", "layer_range": [2, 4], "parameters": {"scale": 0.5}}]}]}
    recipe = from_mergekit(data)
    assert [(s.model, s.layer_range, s.scale) for s in recipe.slices] == [("A", (0, 3), 1.0), ("B", (2, 4), 0.5)]
    assert from_mergekit(to_mergekit(recipe)) == recipe


@pytest.mark.parametrize(
    ("patch", "message"),
    [({"chat_template": "x"}, "unsupported key.*chat_template"),
     ({"tokenizer_source": "union"}, "union")],
)
def test_unsupported_is_an_error(patch, message):
    data = {**yaml.safe_load(TIES), **patch}
    with pytest.raises(ValueError, match=message):
        from_mergekit(data)


def test_unknown_method_is_named_before_any_model_loads():
    """The file format is read without the method registry; the registry check (run by ``evomerge merge`` before
    loading) names the unknown method and lists the valid ones."""
    recipe = from_mergekit({**yaml.safe_load(TIES), "merge_method": "karcher_x"})
    with pytest.raises(ValueError, match="karcher_x.*ties"):
        check_values(recipe)


def test_unsupported_model_key_and_multi_slice():
    data = yaml.safe_load(TIES)
    data["models"][1]["lora"] = "x"
    with pytest.raises(RecipeError, match="lora"):
        from_mergekit(data)
    multi = {"merge_method": "linear", "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]},
        {"sources": [{"model": "A", "layer_range": [2, 4]}, {"model": "B", "layer_range": [2, 4]}]}]}
    with pytest.raises(RecipeError, match="only supported for passthrough"):
        from_mergekit(multi)


def test_int8_mask_dropped_with_warning(caplog):
    data = yaml.safe_load(TIES)
    data["parameters"]["int8_mask"] = True
    with caplog.at_level(logging.WARNING):
        recipe = from_mergekit(data)
    assert "int8_mask" not in recipe.parameters
    assert "int8_mask" in caplog.text


def test_exported_dare_yaml_says_how_mergekit_differs():
    from evomerge.recipe.mergekit import to_mergekit_yaml  # noqa: I001

    recipe = Recipe(method="dare_ties", base="b", sources=[{"model": "a", "parameters": {"density": 0.5}}], seed=7)
    text = to_mergekit_yaml(recipe)
    assert text.startswith("# evomerge draws the dare_ties masks") and "seed 7" in text
    assert yaml.safe_load(text)["merge_method"] == "dare_ties"  # still a plain mergekit config
    assert not to_mergekit_yaml(Recipe(method="ties", base="b", sources=[{"model": "a"}])).startswith("#")


def test_karcher_keeps_the_base_as_an_input_where_mergekit_has_it():
    added = {"merge_method": "karcher", "base_model": "B", "models": [{"model": "A"}, {"model": "C"}]}
    recipe = from_mergekit(added)
    assert [s.model for s in recipe.sources] == ["A", "C", "B"]  # mergekit appends an unlisted base
    assert from_mergekit(to_mergekit(recipe)) == recipe
    listed = {"merge_method": "karcher", "base_model": "B", "models": ["A", "B", "C"]}
    assert [s.model for s in from_mergekit(listed).sources] == ["A", "B", "C"]
    # a search's karcher recipe with a base it does not average: exported without it (mergekit would add it)
    searched = Recipe(method="karcher", base="B", sources=[{"model": "A"}, {"model": "C"}])
    exported = to_mergekit(searched)
    assert "base_model" not in exported and [m["model"] for m in exported["models"]] == ["A", "C"]


@pytest.mark.parametrize("config", [
    {"merge_method": "nearswap", "base_model": "B", "models": ["A"], "parameters": {"t": 0.001}},
    {"merge_method": "arcee_fusion", "base_model": "B", "models": ["B", "A"]},
    {"merge_method": "sce", "base_model": "B", "models": ["A", "C"], "parameters": {"select_topk": 0.1}},
    {"merge_method": "ram", "base_model": "B", "models": ["A", "C"], "parameters": {"epsilon": 1e-4}},
    {"merge_method": "ramplus_tl", "base_model": "B", "models": ["A", "C"],
     "parameters": {"r": 0.2, "alpha": 0.3, "epsilon": 1e-4}},
    {"merge_method": "nuslerp", "models": [{"model": "A", "parameters": {"weight": 0.4}},
                                           {"model": "C", "parameters": {"weight": 0.6}}],
     "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    {"merge_method": "karcher", "models": ["A", "C"], "parameters": {"max_iter": 20, "tol": 1e-6}},
])
def test_methods_from_mergekit_import_and_export_with_mergekit_names(config):
    recipe = from_mergekit(config)
    assert recipe.method == config["merge_method"] and recipe.parameters == config.get("parameters", {})
    assert [s.model for s in recipe.sources] == [m for m in ("A", "C") if m in str(config["models"])]
    exported = to_mergekit(recipe)
    assert exported.get("parameters", {}) == config.get("parameters", {})
    assert from_mergekit(exported) == recipe


def test_linear_averages_the_base_in_as_mergekit_does():
    """mergekit's linear ignores which model is the base: an unlisted base_model is one more input (appended last),
    weighted like the others, and an input without a weight is an error there (no default), here too."""
    two = [{"model": "A", "parameters": {"weight": 0.5}}, {"model": "C", "parameters": {"weight": 0.3}}]
    weighted = {"merge_method": "linear", "base_model": "B", "parameters": {"weight": 0.2}, "models": two}
    recipe = from_mergekit(weighted)
    assert [(s.model, s.parameters) for s in recipe.sources] == [("A", {"weight": 0.5}), ("C", {"weight": 0.3}),
                                                                  ("B", {})]
    assert recipe.parameters == {"weight": 0.2}  # the base's weight: the top-level default
    assert from_mergekit(to_mergekit(recipe)) == recipe
    listed = {"merge_method": "linear", "base_model": "B",
              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("A", "B", "C")]}
    assert [s.model for s in from_mergekit(listed).sources] == ["A", "B", "C"]
    unweighted = {"merge_method": "linear", "base_model": "B", "models": two}
    with pytest.raises(RecipeError, match=r"mergekit linear needs a weight for every input model.*: B has none"):
        from_mergekit(unweighted)
    # a linear recipe whose base is not averaged (evomerge's own): exported without base_model
    exported = to_mergekit(Recipe(method="linear", base="B", sources=[{"model": "A"}, {"model": "C"}]))
    assert "base_model" not in exported and [m["model"] for m in exported["models"]] == ["A", "C"]


@pytest.mark.parametrize("config", [
    {"merge_method": "nuslerp", "models": [{"model": "A", "parameters": {"weight": 2.5}},
                                           {"model": "C", "parameters": {"weight": 0.5}}]},
    {"merge_method": "task_arithmetic", "base_model": "B", "parameters": {"lambda": 3.0},
     "models": [{"model": "A", "parameters": {"weight": -2.5}}, {"model": "C", "parameters": {"weight": 4.0}}]},
    {"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": -0.5}},
                                          {"model": "C", "parameters": {"weight": [1.5, 3.0]}}]},
    {"merge_method": "ties", "base_model": "B", "parameters": {"lambda": -1.0},
     "models": [{"model": "A", "parameters": {"weight": 5.0, "density": 0.5}}]},
])
def test_imported_recipes_take_any_weight_and_lambda_as_mergekit_does(config):
    check_values(from_mergekit(config))  # no MethodError: mergekit bounds neither weight nor lambda


def test_recipe_ranges_are_wider_than_search_ranges_only_for_weight_and_lambda():
    from evomerge.methods import MethodError, get_method, validate_params

    ties = get_method("ties")
    validate_params(ties, {"weight": [3.0, -1.0], "lambda": 2.5}, 2, True, recipe=True)
    with pytest.raises(MethodError, match=r"'weight' = 3.0 is out of range \[0.0, 2.0\]"):
        validate_params(ties, {"weight": [3.0, 1.0]}, 2, True)  # a search space or sweep keeps [0, 2]
    with pytest.raises(MethodError, match=r"'density' = 1.5 is out of range \[0.0, 1.0\]"):
        validate_params(ties, {"density": [0.5, 1.5]}, 2, True, recipe=True)  # a fraction stays a fraction


@pytest.mark.parametrize(("dtypes", "recipe_dtype"), [
    ({"dtype": "float32", "out_dtype": "bfloat16"}, "bfloat16"),  # mergekit computes in fp32, writes bf16
    ({"dtype": "bfloat16"}, "bfloat16"),  # out_dtype defaults to dtype
    ({"out_dtype": "float16"}, "float16"),
    ({"dtype": "bfloat16", "out_dtype": "float32"}, "float32"),
])
def test_dtype_and_out_dtype_import_as_the_output_dtype(dtypes, recipe_dtype):
    config = {"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"density": 0.5}}],
              **dtypes}
    assert from_mergekit(config).dtype == recipe_dtype


def test_low_precision_recipes_export_as_fp32_compute_with_out_dtype():
    """evomerge computes in fp32 and rounds once: exported, mergekit is told to do the same."""
    bf16 = to_mergekit(Recipe(method="linear", sources=[{"model": "A"}, {"model": "C"}], dtype="bfloat16"))
    assert (bf16["dtype"], bf16["out_dtype"]) == ("float32", "bfloat16")
    fp32 = to_mergekit(Recipe(method="linear", sources=[{"model": "A"}, {"model": "C"}], dtype="float32"))
    assert fp32["dtype"] == "float32" and "out_dtype" not in fp32
    assert "dtype" not in to_mergekit(Recipe(method="linear", sources=[{"model": "A"}, {"model": "C"}]))


def _model_dirs(root, **files):
    """Dirs named by the keys holding the file named by each value: only what the adapter check looks at."""
    paths = {}
    for name, file in files.items():
        (root / name).mkdir()
        (root / name / file).write_text("{}")
        paths[name] = str(root / name)
    return paths


def test_adapter_sources_export_as_mergekits_base_plus_adapter_and_back(tmp_path):
    p = _model_dirs(tmp_path, base="config.json", ft="config.json", lora="adapter_config.json",
                    lora2="adapter_config.json")
    ties = Recipe(method="ties", base=p["base"], parameters={"lambda": 0.9},
                  sources=[{"model": p["lora"], "parameters": {"density": 0.5, "weight": 1.0}},
                           {"model": p["ft"], "parameters": {"density": 0.5, "weight": 1.0}}])
    exported = to_mergekit(ties)
    assert exported["base_model"] == p["base"]
    assert [m["model"] for m in exported["models"]] == [f"{p['base']}+{p['lora']}", p["ft"]]
    assert from_mergekit(exported) == ties
    # linear leaves a base that is no source out of the config (mergekit would average it in): the adapters still
    # name the model they sit on, which comes back as the recipe's base
    linear = Recipe(method="linear", base=p["base"], sources=[{"model": p["lora"], "parameters": {"weight": 0.3}},
                                                              {"model": p["lora2"], "parameters": {"weight": 0.7}}])
    exported = to_mergekit(linear)
    assert "base_model" not in exported
    assert [m["model"] for m in exported["models"]] == [f"{p['base']}+{p['lora']}", f"{p['base']}+{p['lora2']}"]
    assert from_mergekit(exported) == linear
    # no base: the adapters sit on the first source, the model the engine opens first, also after the round trip
    average = Recipe(method="linear", sources=[{"model": p["ft"], "parameters": {"weight": 0.5}},
                                               {"model": p["lora"], "parameters": {"weight": 0.5}}])
    exported = to_mergekit(average)
    assert [m["model"] for m in exported["models"]] == [p["ft"], f"{p['ft']}+{p['lora']}"]
    assert from_mergekit(exported).model_paths() == average.model_paths() == [p["ft"], p["lora"]]
    # adapters on two different models, or a method that needs base_model, are still refused
    with pytest.raises(RecipeError, match="is not base_model"):
        from_mergekit({"merge_method": "linear", "models": [{"model": f"{p['ft']}+{p['lora']}"},
                                                            {"model": f"{p['base']}+{p['lora2']}"}]})
    with pytest.raises(RecipeError, match="is not base_model"):
        from_mergekit({"merge_method": "ties", "models": [{"model": f"{p['base']}+{p['lora']}"}]})
