"""Recipe schema and parameter resolution (gradients, filters, positions)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml
from pydantic import ValidationError

from evomerge.recipe import (
    MoeRecipe,
    Recipe,
    RecipeError,
    StackRecipe,
    gradient_position,
    interpolate,
    load_recipe,
    parse_recipe,
    resolve_params,
    resolve_value,
    select_filter,
)


@pytest.mark.parametrize(
    ("value", "position", "expected"),
    [(0.3, 0.7, 0.3), ([0.0, 1.0], 0.5, 0.5), ([0.0, 1.0, 0.0], 0.25, 0.5), ([2.0], 0.9, 2.0),
     ([0.0, 0.4, 1.0], 1.0, 1.0), ([1.0, 3.0], 0.0, 1.0)],
)
def test_interpolate(value, position, expected):
    assert interpolate(value, position) == pytest.approx(expected)


def test_gradient_position_is_mergekits():
    # mergekit/plan.py: t = i / (L - 1) in the stack, 1 for a 1-layer stack, 0 for every tensor outside the stack
    assert gradient_position(0, 4) == 0.0
    assert gradient_position(3, 4) == 1.0
    assert gradient_position(1, 4) == pytest.approx(1 / 3)
    assert gradient_position(None, 4) == 0.0  # embeddings, final norm and lm_head alike (was 1 for norm / head)
    assert gradient_position(0, 1) == 1.0


def test_interpolate_is_bitwise_mergekits_formula():
    # mergekit's (1 - f) * v[i] + f * v[i + 1] at s = t (n - 1); np.interp's v[i] + slope (s - i) rounds otherwise
    value, t = [0.1, 0.7, 0.3], 0.3
    s = t * 2
    assert interpolate(value, t) == (1 - s) * 0.1 + s * 0.7
    assert interpolate([0.0, 1.0, 0.5, 0.25, 2.0], 1.0) == 2.0
    assert interpolate([0.4], 0.7) == 0.4


def test_filters_first_match_then_default():
    value = {"self_attn": 1.0, "mlp": [0.0, 1.0], "default": 3.0}
    assert select_filter(value, "model.layers.0.self_attn.q_proj.weight") == 1.0
    assert resolve_value(value, "model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert resolve_value(value, "model.norm.weight", 1.0) == 3.0
    assert resolve_value({"mlp": 1.0}, "model.norm.weight", 1.0) is None
    assert resolve_value({"q_proj": 2.0, "self_attn": 1.0}, "model.layers.0.self_attn.q_proj.weight", 0) == 2.0


def test_recipe_shape_errors():
    with pytest.raises(ValidationError, match="slices"):
        StackRecipe()
    with pytest.raises(ValidationError, match="'passthrough' is a layer stack: build it as a StackRecipe"):
        Recipe(method="passthrough", sources=[{"model": "a"}])
    with pytest.raises(ValidationError, match="Extra inputs"):  # slices belong to the stack kind
        Recipe(method="linear", sources=[{"model": "a"}], slices=[{"model": "a", "layer_range": [0, 1]}])
    with pytest.raises(ValidationError, match="at least one entry in 'sources'"):
        Recipe(method="ties", base="b")
    with pytest.raises(ValidationError, match="layer_range"):
        StackRecipe(slices=[{"model": "a", "layer_range": [3, 1]}])
    with pytest.raises(ValidationError, match="Extra inputs"):  # a stack has no merge parameters
        parse_recipe({"method": "passthrough", "slices": [{"model": "a", "layer_range": [0, 1]}],
                      "parameters": {"weight": 1.0}})


def test_parse_recipe_picks_the_kind_and_reads_stacks_stored_before_kinds():
    stack = parse_recipe({"method": "passthrough", "slices": [{"model": "a", "layer_range": [0, 2]}]})
    assert isinstance(stack, StackRecipe) and stack.model_paths() == ["a"]
    merge = parse_recipe({"method": "ties", "base": "b", "sources": [{"model": "a"}]})
    assert isinstance(merge, Recipe) and merge.model_paths() == ["b", "a"]
    # what a study stored for a stack before recipes had kinds: every field of the one recipe class
    legacy = {"method": "passthrough", "base": None, "sources": [], "parameters": {}, "dtype": None, "seed": 0,
              "tokenizer_source": None, "calibration": None,
              "slices": [{"model": "a", "layer_range": [0, 2], "scale": 1.0}]}
    assert parse_recipe(legacy) == stack
    assert parse_recipe(stack.model_dump(mode="json")) == stack  # round trip of the new form
    with pytest.raises(ValidationError, match="Extra inputs"):
        Recipe(method="linear", sources=[{"model": "a"}], wieghts=1)
    with pytest.raises(ValidationError, match="dtype"):
        Recipe(method="linear", sources=[{"model": "a"}], dtype="int8")


def test_yaml_round_trip(tmp_path):
    recipe = Recipe(
        method="ties", base="b", seed=7, dtype="bfloat16",
        sources=[{"model": "x", "parameters": {"weight": {"self_attn": [0.1, 0.9], "default": 0.5}, "density": 0.4}},
                 {"model": "y"}],
        parameters={"lambda": 0.8},
    )
    recipe.to_yaml(tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again == recipe
    assert again.model_paths() == ["b", "x", "y"]


KINDS = [
    Recipe(method="ties", base="b", sources=[{"model": "x"}]),
    StackRecipe(slices=[{"model": "a", "layer_range": [0, 2]}, {"model": "c", "layer_range": [1, 2], "scale": 0.5}]),
    MoeRecipe(base="b", gate_mode="random", experts=[{"model": "x"}, {"model": "y"}], experts_per_token=1, seed=3),
]


@pytest.mark.parametrize("recipe", KINDS, ids=["merge", "stack", "moe"])
def test_every_kind_round_trips_through_yaml_and_the_stored_form(recipe, tmp_path):
    """The YAML a recipe writes carries its kind's tag (``method: passthrough``, ``kind: moe``) although the tag is
    a default: ``evomerge merge best_recipe.yaml`` must read the same kind back."""
    recipe.to_yaml(tmp_path / "r.yaml")
    assert next(iter(yaml.safe_load((tmp_path / "r.yaml").read_text()))) == next(iter(type(recipe).model_fields))
    assert load_recipe(tmp_path / "r.yaml") == recipe
    assert parse_recipe(recipe.model_dump(mode="json")) == recipe  # a study's stored trial recipe


def test_an_moe_recipe_is_one_more_kind_with_its_own_keys_and_one_line_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("kind: moe\nbase: b\nexperts:\n  - model: a\n    positive_promts: [p]\n")
    with pytest.raises(RecipeError, match=r"experts\[0\]: unknown key 'positive_promts' \(did you mean "
                                          r"'positive_prompts'\?\)"):
        load_recipe(path)
    path.write_text("kind: moe\nbase: b\nexperts: [{model: a, positive_prompts: [p]}]\nexperts_per_token: 2\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "experts_per_token is 2 but there are only 1 experts" in str(err.value) and "\n" not in str(err.value)
    path.write_text("method: ties\nbase: b\nsources: []\n")  # every kind's validation errors are one line
    with pytest.raises(RecipeError, match=r"r.yaml: value: method 'ties' needs at least one entry in 'sources'$"):
        load_recipe(path)
    with pytest.raises(ValidationError, match="Extra inputs"):  # an MoE has no merge keys
        parse_recipe({"kind": "moe", "base": "b", "experts": [{"model": "a"}], "gate_mode": "random",
                      "sources": []})


def test_a_misspelt_key_is_named_with_the_closest_valid_one(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: ties\nbase: b\nsourcs:\n  - model: a\n")
    with pytest.raises(RecipeError, match=r"unknown key 'sourcs' \(did you mean 'sources'\?\); valid keys: method"):
        load_recipe(path)
    path.write_text("method: ties\nbase: b\nsources:\n  - model: a\n    parametrs: {density: 0.5}\n")
    with pytest.raises(RecipeError, match=r"sources\[0\]: unknown key 'parametrs' \(did you mean 'parameters'\?\)"):
        load_recipe(path)


@dataclass(frozen=True)
class _P:
    name: str
    default: float | bool | None
    per_source: bool


@dataclass(frozen=True)
class _M:
    params: tuple[_P, ...]


def test_resolve_params_source_then_recipe_then_default():
    """Hand-worked values on a 5-layer stack (positions 0, .25, .5, .75, 1), with a method spec that is plain data:
    resolution needs neither the registry nor a model."""
    method = _M((_P("weight", 1.0, True), _P("density", None, True), _P("lambda", 1.0, False)))
    recipe = Recipe(method="ties", base="b", sources=[
        {"model": "a", "parameters": {"weight": [0.0, 1.0], "density": {"mlp": 0.2}}},
        {"model": "c", "parameters": {}},
    ], parameters={"density": 0.6, "lambda": {"self_attn": [1.0, 2.0, 0.0]}, "typo": 3})
    mlp, attn = "model.layers.1.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    assert resolve_params(recipe, method, mlp, 5) == {"weight": [0.25, 1.0], "density": [0.2, 0.6], "typo": 3}
    # layer 3 of 5 is at 0.75: weight 0.75; the per-filter density of source a falls through to the recipe's 0.6;
    # lambda's gradient [1, 2, 0] at 0.75 is 1.0
    assert resolve_params(recipe, method, attn, 5) == {"weight": [0.75, 1.0], "density": [0.6, 0.6], "lambda": 1.0,
                                                       "typo": 3}
    only_recipe = Recipe(method="ties", base="b", sources=[{"model": "a"}, {"model": "c"}])
    assert resolve_params(only_recipe, method, mlp, 5) == {}  # nothing set: every default applies


def test_recipe_imports_without_torch_or_transformers():
    code = ("import sys, evomerge.recipe, evomerge.naming; "
            "print(sorted(m for m in ('torch', 'transformers', 'evomerge.methods') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
