"""Search spaces: YAML -> trial suggestions -> Recipe, baselines, load-time errors."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial

from evomerge.engine.stacking import layer_plan
from evomerge.methods import METHODS, MergeMethod, get_method, validate_params
from evomerge.recipe import Recipe, resolve_params
from evomerge.search.space import (
    NAMING,
    ModelSet,
    SearchSpace,
    SpaceError,
    penalized,
)

pytestmark = pytest.mark.usefixtures("quiet_optuna")


SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
MODELS = ModelSet(base="zoo/base", sources=["zoo/a", "zoo/b", "zoo/c"], num_layers=4)
PAIR = ModelSet(base="zoo/base", sources=["zoo/a", "zoo/b"], num_layers=4)


def tensor_names(num_layers: int) -> list[str]:
    """Llama-style names: every filter at every layer, plus the tensors outside the stack."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in range(num_layers):
        names += [f"model.layers.{layer}.self_attn.q_proj.weight", f"model.layers.{layer}.mlp.up_proj.weight",
                  f"model.layers.{layer}.input_layernorm.weight"]
    return names


def resolved(recipe: Recipe, name: str, num_layers: int) -> dict[str, object]:
    """The parameters one tensor gets (source's own value, else the recipe's, else the method default), every
    parameter of the method present, as the engine passes them."""
    method = get_method(recipe.method)
    values = resolve_params(recipe, method, name, num_layers)
    n = len(recipe.sources)
    return {p.name: values.get(p.name, [p.default] * n if p.per_source else p.default) for p in method.params}


def merge(method: MergeMethod, params: dict[str, object], base: torch.Tensor, sources: torch.Tensor,
          stats: torch.Tensor | None = None) -> torch.Tensor:
    """Call the registry function with ``params`` (defaults filled in), as the engine does."""
    kwargs: dict[str, object] = {}
    for p in method.params:
        value = params.get(p.name, p.default)
        if p.per_source:
            value = torch.tensor(value if isinstance(value, list) else [value] * len(sources), dtype=torch.float32)
        kwargs[p.key] = value
    return method.fn(base, sources, **method.whole_tensor_inputs(0, stats), **kwargs)


def dyadic(*shape: int, seed: int) -> torch.Tensor:
    """Multiples of 1/16 in [-4, 4): sums, differences and unit-weight products of these are exact in float32."""
    return torch.randint(-64, 64, shape, generator=torch.Generator().manual_seed(seed)).float() / 16


HALVES = ["[layers 0-1]", "[layers 2-3]"]  # the layer ranges of 2 groups over 4 layers


def space(**data: object) -> SearchSpace:
    return SearchSpace.from_dict(data)


def names_of(sp: SearchSpace, models: ModelSet, naming: int = NAMING) -> list[str]:
    """The trial parameter names a space suggests, through a trial of a study in memory."""
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(0)).ask()
    sp.suggest(trial, models, naming)
    return list(trial.params)


# ------------------------------------------------------------------------------------------- resolution
def test_step_groups_and_filters_from_fixed_trial():
    sp = space(method="ties", layer_groups=2, filters=["self_attn"],
               parameters={"weight": {"low": 0.0, "high": 1.0}, "density": "search", "lambda": 0.75})
    # weight[<source i>][<f>][<group g>] = i/4 + g/16 + (f == default)/64 (exact in binary); density the same + 1/8.
    params = {}
    for i in range(3):
        for g in range(2):
            for j, f in enumerate(["self_attn", "default"]):
                params[f"weight[{'abc'[i]}][{f}]{HALVES[g]}"] = i / 4 + g / 16 + j / 64
                params[f"density[{'abc'[i]}][{f}]{HALVES[g]}"] = i / 4 + g / 16 + j / 64 + 1 / 8
    assert set(params) == set(names_of(sp, MODELS))
    recipe = sp.suggest(FixedTrial(params), MODELS)
    assert recipe.method == "ties" and recipe.base == "zoo/base"
    assert [s.model for s in recipe.sources] == MODELS.sources
    assert recipe.parameters == {"lambda": 0.75}
    # 4 layers in 2 groups: layers 0, 1 -> g0; layers 2, 3 -> g1 (a list of exactly num_layers values).
    assert recipe.sources[1].parameters["weight"] == {
        "self_attn": [0.25, 0.25, 0.3125, 0.3125], "default": [0.265625, 0.265625, 0.328125, 0.328125]}
    assert recipe.sources[2].parameters["density"]["self_attn"] == [0.625, 0.625, 0.6875, 0.6875]
    # Through the recipe's own resolution: layer 2's MLP is not self_attn -> default of group 1.
    assert resolved(recipe, "model.layers.2.mlp.up_proj.weight", 4)["weight"] == [0.078125, 0.328125, 0.578125]
    assert resolved(recipe, "model.layers.1.self_attn.q_proj.weight", 4)["density"] == [0.125, 0.375, 0.625]
    # outside the stack, t = 0 (mergekit's convention): the first group's default
    assert resolved(recipe, "lm_head.weight", 4)["weight"] == [0.015625, 0.265625, 0.515625]


def test_uneven_groups_all_clamp_and_scalar():
    # L = 4, G = 3: group of layer l = floor(3 l / 4) = 0, 0, 1, 2.
    sp = space(method="linear", layer_groups=3, parameters={"weight": "search"})
    params = {f"weight[{'abc'[i]}]{layers}": 0.25 + i / 2 + g / 8 for i in range(3)
              for g, layers in enumerate(["[layers 0-1]", "[layer 2]", "[layer 3]"])}
    assert set(params) == set(names_of(sp, MODELS))
    recipe = sp.suggest(FixedTrial(params), MODELS)
    assert recipe.sources[1].parameters["weight"] == [0.75, 0.75, 0.875, 1.0]
    # `all` and a group count above the depth both give one group per layer.
    for groups in ("all", 9):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(0)).ask()
        recipe = space(method="linear", layer_groups=groups, parameters={"weight": "search"}).suggest(trial, MODELS)
        assert sorted(trial.params) == sorted(f"weight[{s}][layer {g}]" for s in "abc" for g in range(4))
        assert recipe.sources[2].parameters["weight"] == [trial.params[f"weight[c][layer {g}]"] for g in range(4)]
    # One group: a scalar per source, no layer range in the name.
    recipe = space(method="linear", parameters={"weight": "search"}).suggest(
        FixedTrial({"weight[a]": 0.5, "weight[b]": 1.5, "weight[c]": 2.0}), MODELS)
    assert [s.parameters["weight"] for s in recipe.sources] == [0.5, 1.5, 2.0]


def test_gradient_profile_and_layerwise_switches():
    sp = space(method="slerp", layer_groups=3, layer_profile="gradient",
               parameters={"t": {"low": 0.0, "high": 1.0, "layerwise": True}})
    five = ModelSet(base=None, sources=["a", "b"], num_layers=5)
    # anchor g of 3 over 5 layers sits at layer g * 4 / 2
    recipe = sp.suggest(FixedTrial({"t[at layer 0]": 0.0, "t[at layer 2]": 0.5, "t[at layer 4]": 0.75}), five)
    assert recipe.parameters == {"t": [0.0, 0.5, 0.75]}  # anchors at positions 0, 0.5, 1
    # Layer 1 of 5 sits at position 0.25, half-way between the first two anchors.
    assert resolved(recipe, "model.layers.1.mlp.up_proj.weight", 5)["t"] == pytest.approx(0.25)
    assert resolved(recipe, "model.layers.3.mlp.up_proj.weight", 5)["t"] == pytest.approx(0.625)
    # layerwise false on a per-source parameter; true on a global one.
    sp = space(method="task_arithmetic", layer_groups=2,
               parameters={"weight": {"layerwise": False}, "lambda": {"low": 0.5, "high": 1.5, "layerwise": True}})
    params = {"weight[a]": -1.0, "weight[b]": 0.5, "weight[c]": 2.0, "lambda[layers 0-1]": 0.5,
              "lambda[layers 2-3]": 1.5}
    assert set(params) == set(names_of(sp, MODELS))
    recipe = sp.suggest(FixedTrial(params), MODELS)
    assert [s.parameters["weight"] for s in recipe.sources] == [-1.0, 0.5, 2.0]  # registry range [-2, 2]
    assert recipe.parameters == {"lambda": [0.5, 0.5, 1.5, 1.5]}


def test_method_choice_conditional_params():
    sp = SearchSpace.from_yaml(SPACES / "method_choice.yaml")
    ta = {"method": "task_arithmetic", "task_arithmetic/lambda": 1.25,
          **{f"task_arithmetic/weight[{s}]": 0.25 * i for i, s in enumerate("abc")}}
    recipe = sp.suggest(FixedTrial(ta), MODELS)
    assert recipe.method == "task_arithmetic"
    assert recipe.parameters == {"lambda": 1.25}
    assert [s.parameters for s in recipe.sources] == [{"weight": 0.0}, {"weight": 0.25}, {"weight": 0.5}]
    ties = {"method": "ties", "ties/lambda": 0.5}
    ties |= {f"ties/{p}[{'abc'[i]}]{HALVES[g]}": 0.25 + i / 8 + g / 16 for p in ("weight", "density")
             for i in range(3) for g in range(2)}
    recipe = sp.suggest(FixedTrial(ties), MODELS)
    assert recipe.parameters == {"lambda": 0.5}
    assert recipe.sources[1].parameters == {"weight": [0.375, 0.375, 0.4375, 0.4375],
                                            "density": [0.375, 0.375, 0.4375, 0.4375]}
    # A real study: a trial only holds the chosen method's parameters.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(3))
    for _ in range(12):
        trial = study.ask()
        recipe = sp.suggest(trial, MODELS)
        chosen = trial.params["method"]
        assert recipe.method == chosen
        assert all(k == "method" or k.startswith(f"{chosen}/") for k in trial.params)
        study.tell(trial, 0.0)
    assert len({t.params["method"] for t in study.trials}) > 1


def test_random_sampler_is_deterministic_and_recipe_mirrors_params():
    sp = SearchSpace.from_yaml(SPACES / "ties_dare_layerwise.yaml")

    def first(seed: int, n: int = 3) -> list[tuple[dict, Recipe]]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed))
        out = []
        for _ in range(n):
            trial = study.ask()
            recipe = sp.suggest(trial, MODELS)
            out.append((trial.params, recipe))
            study.tell(trial, 0.0)
        return out

    a, b, c = first(11), first(11), first(12)
    assert [r for _, r in a] == [r for _, r in b]
    assert [r for _, r in a] != [r for _, r in c]
    for params, recipe in a:  # 4 groups over 4 layers: layer l holds group l's value
        for i, source in enumerate(recipe.sources):
            assert source.parameters["weight"] == [params[f"weight[{'abc'[i]}][layer {g}]"] for g in range(4)]
            assert source.parameters["density"] == [params[f"density[{'abc'[i]}][layer {g}]"] for g in range(4)]
            assert all(0.1 <= d <= 1.0 for d in source.parameters["density"])


def test_parameter_names_say_source_filter_and_layer_range():
    experts = ModelSet(base="zoo/base", sources=["zoo/expert_math", "zoo/expert_code"], num_layers=16)
    sp = space(method="dare_ties", layer_groups=2, filters=["mlp"],
               parameters={"weight": "search", "density": "search", "lambda": {"low": 0.5, "high": 1.5}})
    names = names_of(sp, experts)
    assert "density[expert_math][mlp][layers 0-7]" in names and "weight[expert_code][default][layers 8-15]" in names
    assert sorted(names) == sorted([f"{p}[{s}][{f}][layers {r}]" for p in ("weight", "density")
                                    for s in ("expert_math", "expert_code") for f in ("mlp", "default")
                                    for r in ("0-7", "8-15")] + ["lambda"])
    # gradient anchors: anchor g of 3 over 4 layers sits at layer 1.5 g
    sp = space(method="slerp", layer_groups=3, layer_profile="gradient",
               parameters={"t": {"low": 0.0, "high": 1.0, "layerwise": True}})
    assert names_of(sp, ModelSet(base=None, sources=["x/a", "y/a"], num_layers=4)) == [
        "t[at layer 0]", "t[at layer 1.5]", "t[at layer 3]"]
    # two sources with one dir name are named by their paths; one path listed twice, by index too
    sp = space(method="linear", parameters={"weight": "search"})
    assert names_of(sp, ModelSet(base=None, sources=["x/a", "y/a"], num_layers=4)) == ["weight[x/a]", "weight[y/a]"]
    assert names_of(sp, ModelSet(base=None, sources=["x/a", "x/a"], num_layers=4)) == ["weight[0:x/a]",
                                                                                         "weight[1:x/a]"]


def test_naming_version_1_keeps_the_index_names_of_old_studies():
    sp = space(method="ties", layer_groups=2, filters=["self_attn"],
               parameters={"weight": "search", "density": 1.0, "lambda": {"low": 0.5, "high": 1.5,
                                                                           "layerwise": True}})
    assert names_of(sp, PAIR, naming=1) == [f"{p}{s}/g{g}/{f}" for p, sources in (("weight", ("/s0", "/s1")),
                                                                                ("lambda", ("",)))
                                            for s in sources for g in (0, 1) for f in ("self_attn", "default")]
    # the baselines of an old study are enqueued with its own names, and give the same recipe as the new names
    old, new = (dict(sp.baseline_params(PAIR, naming)) for naming in (1, NAMING))
    assert old["source:b"]["weight/s1/g0/self_attn"] == 1.0
    assert new["source:b"]["weight[b][self_attn][layers 0-1]"] == 1.0
    assert sp.suggest(FixedTrial(old["source:b"]), PAIR, 1) == sp.suggest(FixedTrial(new["source:b"]), PAIR)


# -------------------------------------------------------------------------------------------- baselines
# methods no parameter values turn into one source or the uniform average exactly
NO_IDENTITY_RULES = {"model_stock", "regmean", "nearswap", "arcee_fusion", "sce", "ram", "ramplus_tl", "nuslerp",
                     "karcher", "multislerp"}


# lorahub merges LoRA factors, not dense tensors: tests/test_lorahub.py
@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if not m.takes_factors))
def test_registry_identity_rules(method):
    """Each method's declared baseline points (source alone, uniform average) against its own formula on small
    tensors; the points name the method's own parameters only."""
    m = get_method(method)
    n = 2 if m.max_sources == 2 else 3
    base, sources = dyadic(6, 4, seed=0), torch.stack([dyadic(6, 4, seed=1 + i) for i in range(n)])
    stats = dyadic(n, 6, 4, seed=9).abs() + 0.0625 if m.statistic == "fisher" else None
    if m.name in NO_IDENTITY_RULES:
        assert m.source_alone_points(0, n) == [] and m.uniform_points(n) == []
        return
    own = {p.name for p in m.params}
    for i in range(n):
        (target,) = m.source_alone_points(i, n)
        assert set(target) <= own
        validate_params(m, target, n, True)
        assert torch.equal(merge(m, target, base, sources, stats), sources[i])
    for target in m.uniform_points(n):
        assert set(target) <= own
        torch.testing.assert_close(merge(m, target, base, sources, stats), sources.mean(0), rtol=0, atol=1e-6)


def test_source_and_uniform_baselines_reproduce_through_the_space():
    base, sources = dyadic(6, 4, seed=0), torch.stack([dyadic(6, 4, seed=1 + i) for i in range(3)])
    for file in ("ties_dare_layerwise.yaml", "task_arithmetic.yaml", "method_choice.yaml"):
        sp = SearchSpace.from_yaml(SPACES / file)
        baselines = dict(sp.baseline_params(MODELS))
        assert {"source:a", "source:b", "source:c"} <= set(baselines)
        for i, label in enumerate(["source:a", "source:b", "source:c"]):
            recipe = sp.suggest(FixedTrial(baselines[label]), MODELS)
            for name in tensor_names(4):
                params = resolved(recipe, name, 4)
                assert params["weight"] == [1.0 if j == i else 0.0 for j in range(3)]
                got = merge(get_method(recipe.method), params, base, sources)
                assert torch.equal(got, sources[i]), (file, label, name)
        if file == "ties_dare_layerwise.yaml":
            assert "uniform" not in baselines  # sign election: no parameters give the plain average
        else:
            recipe = sp.suggest(FixedTrial(baselines["uniform"]), MODELS)
            assert recipe.method == "task_arithmetic"
            params = resolved(recipe, "model.layers.3.mlp.up_proj.weight", 4)
            assert params["weight"] == pytest.approx([1 / 3] * 3) and params["lambda"] == 1.0
            torch.testing.assert_close(merge(get_method("task_arithmetic"), params, base, sources),
                                       sources.mean(0), rtol=0, atol=1e-6)


def test_defaults_and_slerp_baselines():
    sp = SearchSpace.from_yaml(SPACES / "method_choice.yaml")
    labels = [label for label, _ in sp.baseline_params(MODELS)]
    assert labels == ["source:a", "source:b", "source:c", "uniform",
                      "defaults:ties", "defaults:dare_ties", "defaults:task_arithmetic"]
    defaults = dict(sp.baseline_params(MODELS))["defaults:dare_ties"]
    recipe = sp.suggest(FixedTrial(defaults), MODELS)
    params = resolved(recipe, "model.layers.0.self_attn.q_proj.weight", 4)
    assert params == {"weight": [1.0] * 3, "density": [1.0] * 3, "lambda": 1.0, "normalize": False, "rescale": True}
    # slerp: t = 0 everywhere is the first source, t = 1 the second; no defaults (t has none), no uniform.
    sp = SearchSpace.from_yaml(SPACES / "slerp_gradient.yaml")
    baselines = sp.baseline_params(PAIR)
    assert [label for label, _ in baselines] == ["source:a", "source:b"]
    base, sources = dyadic(6, 4, seed=0), torch.stack([dyadic(6, 4, seed=1), dyadic(6, 4, seed=2)])
    for i, (_, params) in enumerate(baselines):
        assert set(params.values()) == {float(i)} and len(params) == 12  # 4 anchors (4 layers) x 3 filters
        recipe = sp.suggest(FixedTrial(params), PAIR)
        for name in tensor_names(4):
            assert torch.equal(merge(get_method("slerp"), resolved(recipe, name, 4), base, sources), sources[i])


def test_baselines_outside_the_space_are_skipped_with_a_reason(caplog):
    sp = space(method="dare_linear", parameters={"weight": "search", "density": 0.5})
    with caplog.at_level(logging.DEBUG, logger="evomerge.search.space"):
        baselines = sp.baseline_params(MODELS)
    assert [label for label, _ in baselines] == []  # density fixed at 0.5 trims: no baseline is exact
    assert "the space fixes it at 0.5" in caplog.text
    sp = space(method="task_arithmetic", parameters={"weight": {"low": 0.25, "high": 1.0, "step": 0.25}})
    with caplog.at_level(logging.DEBUG, logger="evomerge.search.space"):
        labels = [label for label, _ in sp.baseline_params(MODELS)]
    assert labels == ["defaults"]  # weight 0 is outside [0.25, 1]; 1/3 is off the 0.25 grid; lambda is not searched
    assert "weight[b] = 0.0, outside the space's range [0.25, 1.0]" in caplog.text
    assert "needs lambda = 0.3333333333333333; the space leaves it at its default 1.0" in caplog.text


def test_references_are_the_baselines_the_space_cannot_express():
    # task arithmetic expresses every source alone and the average: nothing to score beside the study
    assert space(method="task_arithmetic", parameters={"weight": "search", "lambda": "search"}
                 ).reference_recipes(MODELS) == []
    # with density fixed at 0.5 none is expressible: each source alone and the average, as linear recipes
    references = dict(space(method="dare_linear", parameters={"weight": "search", "density": 0.5}
                            ).reference_recipes(MODELS))
    assert list(references) == ["source:a", "source:b", "source:c", "uniform"]
    base, sources = dyadic(4, 4, seed=0), dyadic(3, 4, 4, seed=1)
    for label, recipe in references.items():
        assert recipe.method == "linear"
        merged = merge(get_method("linear"), resolved(recipe, "model.layers.0.mlp.up_proj.weight", 4), base, sources)
        expected = sources.mean(0) if label == "uniform" else sources["abc".index(label[-1])]
        assert torch.allclose(merged, expected, atol=1e-7, rtol=0)


# --------------------------------------------------------------------------------------- layer stacking
def test_layer_stacking_path_choices_and_baseline():
    sp = space(method="passthrough", max_layers="1.5x", window=1, scale={"low": 0.5, "high": 1.5})
    assert sp.spec.slots(MODELS) == 6
    # Slot 2 of 6 sits at layer round(2 * 3 / 5) = 1 of 4: layers 0..2 within the window; slot 0 never skips.
    assert sp.spec.choices(2, MODELS) == ["skip"] + [f"s{i}/l{j}" for i in range(3) for j in (0, 1, 2)]
    assert "skip" not in sp.spec.choices(0, MODELS)
    params = {"slot/0": "s0/l0", "scale/0": 1.0, "slot/1": "s0/l1", "scale/1": 1.0, "slot/2": "s0/l2",
              "scale/2": 0.5, "slot/3": "skip", "slot/4": "s2/l2", "scale/4": 1.5, "slot/5": "s2/l3", "scale/5": 1.5}
    recipe = sp.suggest(FixedTrial(params), MODELS)
    assert recipe.method == "passthrough" and recipe.base == "zoo/base"
    assert [(s.model, s.layer_range, s.scale) for s in recipe.slices] == [
        ("zoo/a", (0, 2), 1.0), ("zoo/a", (2, 3), 0.5), ("zoo/c", (2, 4), 1.5)]
    # With a base the embeddings are the base's: no source alone. Without one, each source's own path.
    assert sp.baseline_params(MODELS) == []
    no_base = ModelSet(base=None, sources=MODELS.sources, num_layers=4)
    baselines = sp.baseline_params(no_base)
    assert [label for label, _ in baselines] == ["source:a", "source:b", "source:c"]
    for i, (_, params) in enumerate(baselines):
        recipe = sp.suggest(FixedTrial(params), no_base)
        plan = layer_plan(recipe, {m: 4 for m in no_base.sources})
        assert plan == [(no_base.sources[i], j, 1.0) for j in range(4)]
        assert recipe.slices[0].model == no_base.sources[i]  # embeddings come from the first slice's model


def test_every_shipped_space_suggests_valid_recipes():
    # MoE spaces (kind: moe) propose MoE recipes: tests/test_moe_search.py checks the shipped one
    files = sorted(f for f in SPACES.glob("*.yaml") if "kind: moe" not in f.read_text())
    assert {f.name for f in files} >= {"ties_dare_layerwise.yaml", "task_arithmetic.yaml", "slerp_gradient.yaml",
                                       "method_choice.yaml", "layer_stacking.yaml"}
    for file in files:
        sp = SearchSpace.from_yaml(file)
        models = PAIR if "slerp" in file.name else MODELS  # slerp merges exactly two sources
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(5))
        baselines = [params for _, params in sp.baseline_params(models)]
        for params in baselines:
            study.enqueue_trial(params)
        for k in range(len(baselines) + 6):
            trial = study.ask()
            recipe = sp.suggest(trial, models)
            if k < len(baselines):  # Optuna accepted every enqueued value as inside the space
                assert trial.params == baselines[k]
            if recipe.method == "passthrough":
                plan = layer_plan(recipe, {m: models.num_layers for m in models.sources})
                assert 1 <= len(plan) <= sp.spec.slots(models)
            else:
                method = get_method(recipe.method)
                for name in tensor_names(models.num_layers):
                    validate_params(method, resolved(recipe, name, models.num_layers), len(models.sources), True)
            study.tell(trial, 0.0)
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_the_l1_penalty_sums_the_searched_weights_of_the_trial_and_nothing_else():
    # per source x layer group (3 x 2 weights; TIES' densities are searched too, and not penalized); with a method
    # choice the chosen method's weights (prefixed by its name)
    for sp, prefix in (
        (space(method="ties", layer_groups=2, penalty={"l1": 0.1},
               parameters={"weight": {"low": 0.0, "high": 2.0}, "density": "search"}), "weight["),
        (space(method={"choice": ["ties", "task_arithmetic"]}, layer_groups=2, penalty={"l1": 0.1},
               parameters={"weight": {"low": 0.0, "high": 2.0}, "density": "search"}), None),
    ):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(3))
        for _ in range(4):
            trial = study.ask()
            sp.suggest(trial, MODELS)
            start = prefix or f"{trial.params['method']}/weight["
            weights = [v for k, v in trial.params.items() if k.startswith(start)]
            assert len(weights) == 6
            assert sp.penalty_of(trial.params, MODELS) == pytest.approx(0.1 * sum(abs(w) for w in weights), abs=1e-15)
            study.tell(trial, 0.0)
    assert space(method="ties").penalty_of({}, MODELS) is None  # no penalty: nothing to fold in
    assert SearchSpace.from_yaml(SPACES / "lorahub.yaml").penalty.l1 == 0.05  # the paper's α


def test_penalized_makes_the_objective_worse_in_either_direction():
    assert penalized(0.75, 0.25, "maximize") == 0.5 and penalized(0.75, 0.25, "minimize") == 1.0


def test_is_continuous():
    assert SearchSpace.from_yaml(SPACES / "ties_dare_layerwise.yaml").is_continuous()
    assert SearchSpace.from_yaml(SPACES / "task_arithmetic.yaml").is_continuous()
    assert not SearchSpace.from_yaml(SPACES / "method_choice.yaml").is_continuous()
    assert not SearchSpace.from_yaml(SPACES / "layer_stacking.yaml").is_continuous()
    assert not space(method="ties", parameters={"density": {"choice": [0.5, 1]}}).is_continuous()
    assert not space(method="ties", parameters={"normalize": "search"}).is_continuous()


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("data", "message"), [
    ({"method": "ties", "layer_group": 2}, "layer_group: unknown key"),
    ({"method": "ties", "parameters": {"weight": {"lo": 0.0}}}, "parameters.weight.lo: unknown key"),
    ({"method": "tie"}, "unknown merge method 'tie'"),
    ({"method": {"choice": ["ties", "slurp"]}}, "unknown merge method 'slurp'"),
    ({"method": "ties", "parameters": {"t": "search"}}, r"unknown parameter\(s\) \['t'\]"),
    ({"method": "ties", "parameters": {"weight": {"low": 0.0, "high": 3.0}}}, "'weight' = 3.0 is out of range"),
    ({"method": "ties", "parameters": {"density": {"choice": [0.5, 1.5]}}}, "'density' = 1.5 is out of range"),
    ({"method": "ties", "parameters": {"density": 1.2}}, "'density' = 1.2 is out of range"),
    ({"method": "ties", "parameters": {"weight": {"low": 0.9, "high": 0.1}}}, "low 0.9 > high 0.1"),
    ({"method": "ties", "parameters": {"weight": {"low": 0.0, "high": 1.0, "log": True}}}, "log range needs low > 0"),
    ({"method": "ties", "parameters": {"normalize": {"low": 0, "high": 1}}}, "is true/false"),
    ({"method": "ties", "parameters": {"weight": "serach"}}, "'serach' is not a parameter entry"),
    ({"method": "slerp"}, "missing required parameter"),
    ({"method": "breadcrumbs", "parameters": {"gamma": {"low": 0.0, "high": 0.2}, "density": "search"}},
     "gamma \\+ density must be <= 1"),
    ({"method": "ties", "method_parameters": {"ties": {}}}, "method_parameters is for a method choice"),
    ({"method": {"choice": ["ties", "linear"]}, "method_parameters": {"slerp": {}}}, "not among the choices"),
    ({"method": "ties", "filters": ["mlp", "default"]}, "other than 'default'"),
    ({"method": "passthrough", "scale": "search"}, "give low and high"),
    ({"method": "passthrough", "max_layers": "two"}, "multiple of the depth"),
    ({"method": "ties", "penalty": {"l1": 0.05}}, "method ties searches none"),
    ({"method": "ties", "parameters": {"weight": 0.5}, "penalty": {"l1": 0.05}}, "method ties searches none"),
    ({"method": {"choice": ["ties", "slerp"]}, "parameters": {"weight": "search", "t": "search"},
      "penalty": {"l1": 0.05}}, "method slerp searches none"),
    ({"method": "ties", "parameters": {"weight": "search"}, "penalty": {"l1": -0.1}}, "penalty.l1: Input should be"),
    ({"method": "ties", "parameters": {"weight": "search"}, "penalty": {"l2": 0.1}}, "penalty.l2: unknown key"),
    ({"method": "passthrough", "penalty": {"l1": 0.05}}, "a layer-stacking space has no such weights"),
    ({"kind": "moe", "penalty": {"l1": 0.05}}, "a mixture-of-experts space has no such weights"),
    ({"method": "passthrough", "scale": {"choice": [-1.0, 1.0]}}, "numbers >= 0"),
])
def test_bad_spaces_fail_at_load(data, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_dict(data)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("method: ties\nparameters:\n  weight: {low: 0, hihg: 1}\n")
    with pytest.raises(SpaceError, match=r"typo.yaml: invalid search space: parameters.weight.hihg: unknown key"):
        SearchSpace.from_yaml(path)


def test_a_space_with_several_errors_names_them_all_on_one_line(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("method: ties\nlayer_group: 2\nparameters:\n  weight: {low: 0, hihg: 1}\n")
    with pytest.raises(SpaceError) as err:
        SearchSpace.from_yaml(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("two.yaml: invalid search space: ")
    hint = "unknown key (see the format in evomerge/search/space.py)"
    assert sorted(message.removeprefix("two.yaml: invalid search space: ").split("; ")) == [
        f"layer_group: {hint}", f"parameters.weight.hihg: {hint}"]


def test_model_set_mismatch_is_a_clear_error():
    with pytest.raises(SpaceError, match="slerp takes exactly 2 sources, the model set has 3"):
        SearchSpace.from_yaml(SPACES / "slerp_gradient.yaml").suggest(FixedTrial({}), MODELS)
    no_base = ModelSet(base=None, sources=MODELS.sources, num_layers=4)
    with pytest.raises(SpaceError, match="give the run a base model"):
        SearchSpace.from_yaml(SPACES / "ties_dare_layerwise.yaml").suggest(FixedTrial({}), no_base)


def test_a_method_choice_space_names_the_methods_from_mergekit():
    one = ModelSet(base="zoo/base", sources=["zoo/a"], num_layers=4)
    spaces = [
        (one, {"method": {"choice": ["nearswap", "arcee_fusion", "sce", "ram", "ramplus_tl", "karcher"]},
               "parameters": {"t": {"low": 0.0, "high": 0.05}, "select_topk": "search", "epsilon": "search",
                              "r": "search", "alpha": "search", "max_iter": {"low": 1, "high": 20, "step": 1}}}),
        (PAIR, {"method": {"choice": ["nuslerp", "karcher", "sce"]}, "layer_groups": 2,
                "parameters": {"weight": "search", "nuslerp_flatten": {"choice": [True, False]},
                               "nuslerp_row_wise": {"choice": [True, False]}, "tol": 1e-4}}),
    ]
    for models, data in spaces:
        sp = space(**data)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(7))
        for _ in range(30):
            trial = study.ask()
            recipe = sp.suggest(trial, models)
            method = get_method(recipe.method)
            for name in tensor_names(models.num_layers):
                validate_params(method, resolved(recipe, name, models.num_layers), len(models.sources), True)
            study.tell(trial, 0.0)
        assert {t.params["method"] for t in study.trials} == set(data["method"]["choice"])  # type: ignore[index]
    with pytest.raises(ValueError, match="nearswap.t has no registry range"):
        space(method="nearswap", parameters={"t": "search"})
