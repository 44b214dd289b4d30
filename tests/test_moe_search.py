"""The MoE search space (names, assembled recipes, baseline, checks) and `evomerge search` of an MoE space on the
mini zoo's experts (examples/moe_search.yaml: one live MoE re-materialized per trial; the best recipe merged again
with `evomerge merge` scores what the study recorded; same seed, same proposals; bad configs refused before any
model loads)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file
from test_cli_errors import one_line
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.evaluate import build_evaluator
from evomerge.moe import MoeModel
from evomerge.recipe import MoeRecipe, load_recipe, parse_recipe
from evomerge.report import moe_layer_table
from evomerge.search.config import ConfigError, RunConfig
from evomerge.search.moe_space import MoeSpace
from evomerge.search.space import ModelSet, RangeSpec, SearchSpace, SpaceError
from evomerge.search.study import run_search, run_soup, run_worker
from evomerge.zoo import Zoo

REPO = Path(__file__).resolve().parent.parent

SPACE = {"layer_groups": 2, "experts_per_token": {"choice": [1, 2, 3]},
         "router_scale": {"low": 0.25, "high": 4.0, "log": True}, "random_weight": {"low": 0.0, "high": 0.5},
         "dense": {"choice": [False, True]}, "dense_method": "task_arithmetic", "dense_weight": {"low": 0.0,
                                                                                                 "high": 1.0},
         "prompts": 2}


def template(paths: list[str], prompts: int = 4, gate_mode: str = "cheap_embed") -> MoeRecipe:
    base, *experts = paths
    return MoeRecipe(base=base, gate_mode=gate_mode, experts_per_token=2, seed=1,
                     experts=[{"model": e, "positive_prompts": [f"{i}-{k}" for k in range(prompts)]}
                              for i, e in enumerate(experts)])


def models(recipe: MoeRecipe, num_layers: int = 2) -> ModelSet:
    return ModelSet(base=recipe.base, sources=[e.model for e in recipe.experts], num_layers=num_layers,
                    template=recipe)


def test_suggestions_are_named_for_what_they_are_and_assemble_the_recipe(tiny_llamas: list[str]) -> None:
    space = MoeSpace.model_validate(SPACE)
    moe = template(tiny_llamas)
    params = {"experts_per_token": 3, "random_weight": 0.2, "router_scale[layer 0]": 0.5, "router_scale[layer 1]": 2.0,
              "dense[layer 0]": False, "dense[layer 1]": True, "dense_weight[ft0]": 0.1, "dense_weight[ft1]": 0.2,
              "dense_weight[ft2]": 0.3, "prompts[ft0]": 2, "prompts[ft1]": 0, "prompts[ft2]": 2}
    recipe = space.suggest(optuna.trial.FixedTrial(params), models(moe))
    assert (recipe.experts_per_token, recipe.random_weight, recipe.router_scale) == (3, 0.2, [0.5, 2.0])
    assert recipe.dense_layers is not None and recipe.dense_layers.layers == [1]
    assert (recipe.dense_layers.method, recipe.dense_layers.weights) == ("task_arithmetic", [0.1, 0.2, 0.3])
    assert [e.positive_prompts for e in recipe.experts] == [["0-2", "0-3"], ["1-0", "1-1"], ["2-2", "2-3"]]
    [(label, baseline)] = space.baseline_params(models(moe))
    again = space.suggest(optuna.trial.FixedTrial(baseline), models(moe))  # mergekit-moe's MoE
    mergekit_moe = moe.model_copy(update={"experts": [e.model_copy(update={"positive_prompts": e.positive_prompts[:2]})
                                                      for e in moe.experts]})
    assert label == "mergekit-moe" and again == mergekit_moe and space.reference_recipes(models(moe)) == []
    # a space without the neutral value cannot express it as a trial: it is scored beside the study instead
    narrow = MoeSpace.model_validate({"random_weight": {"low": 0.1, "high": 0.5}, "prompts": 2})
    assert narrow.baseline_params(models(moe)) == []
    assert narrow.reference_recipes(models(moe)) == [("mergekit-moe", mergekit_moe)]
    fixed = MoeSpace.model_validate({"random_weight": 0.3})  # every trial has r = 0.3: none is mergekit-moe's MoE
    assert fixed.baseline_params(models(moe)) == [] and fixed.reference_recipes(models(moe))[0][1] == moe


@pytest.mark.parametrize(("space", "message"), [
    ({"experts_per_token": {"choice": [1, 4]}}, "experts_per_token takes values in [1, 3] here (3 experts), got [4]"),
    ({"random_weight": {"low": 0.0, "high": 1.5}}, "random_weight takes values in [0, 1] here (3 experts), got [1.5]"),
    ({"prompts": 5}, "prompts is 5 but experts [0, 1, 2] have fewer positive prompts"),
    ({"layer_groups": 3}, "layer_groups 3 > the model's 2 layers"),
    ({"router_scale": {"low": 0.5}}, "router_scale needs low and high"),
])
def test_bad_spaces_are_refused_before_any_trial(tiny_llamas: list[str], space: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=re.escape(message)):
        MoeSpace.model_validate(space).check(models(template(tiny_llamas)))


def test_the_shipped_space_is_one_more_kind_behind_the_search_space_facade(tiny_llamas: list[str], tmp_path) -> None:  # noqa: ANN001
    shipped = SearchSpace.from_yaml(REPO / "search_spaces" / "moe.yaml")
    assert shipped.is_moe and isinstance(shipped.spec, MoeSpace) and not shipped.is_continuous()
    shipped.check(models(template(tiny_llamas)))
    assert isinstance(shipped.spec.router_scale, RangeSpec) and shipped.spec.router_scale.log
    (tmp_path / "bad.yaml").write_text("kind: moe\nlayer_groups: 0\nrouter_scal: 1.0\n")
    with pytest.raises(SpaceError) as err:
        SearchSpace.from_yaml(tmp_path / "bad.yaml")
    assert "layer_groups: Input should be greater than or equal to 1" in str(err.value)
    assert "router_scal: unknown key" in str(err.value)
    with pytest.raises(SpaceError, match="an MoE space .kind: moe. searches around an MoE template"):
        shipped.check(ModelSet(base=tiny_llamas[0], sources=tiny_llamas[1:], num_layers=2))
    with pytest.raises(SpaceError, match="task_arithmetic.yaml: the run config's template is an MoE template, but "
                                         "this is a merge space"):
        SearchSpace.from_yaml(REPO / "search_spaces" / "task_arithmetic.yaml").check(models(template(tiny_llamas)))


# ------------------------------------------------------------------------------------ evomerge search, MoE
def example(mini_zoo: Zoo, root: Path, **evaluator: object) -> Path:
    """examples/moe_search.yaml and its template as shipped, beside a ``zoo`` link to the mini zoo (the layout they
    expect, run from ``root``); ``evaluator`` keys override the config's (a few items per task keep the test at
    seconds)."""
    (root / "examples").mkdir(parents=True)
    (root / "zoo").symlink_to(mini_zoo.root)
    (root / "search_spaces").symlink_to(REPO / "search_spaces")
    shutil.copy(REPO / "examples" / "moe_template.yaml", root / "examples")
    config = yaml.safe_load((REPO / "examples" / "moe_search.yaml").read_text())
    config["evaluator"].update(evaluator)
    (root / "examples" / "moe_search.yaml").write_text(yaml.safe_dump(config))
    return root / "examples" / "moe_search.yaml"


def test_evomerge_search_of_an_moe_space_and_its_best_recipe_merges_to_its_score(
        mini_zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = example(mini_zoo, tmp_path, limit=8)
    monkeypatch.chdir(tmp_path)  # the repository root of the example: its template's model paths are taken from it
    run = tmp_path / "run"
    assert main(["-q", "search", str(config), "--n-trials", "3", "--out", str(run)]) == 0
    study = optuna.load_study(study_name="moe_search", storage=f"sqlite:///{run / 'study.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.user_attrs["kind"] for t in trials] == ["baseline:mergekit-moe"] + ["search"] * 3
    first = parse_recipe(trials[0].user_attrs["recipe"])  # mergekit-moe's MoE of the template, first prompt window
    assert isinstance(first, MoeRecipe)
    assert (first.experts_per_token, first.router_scale, first.dense_layers) == (2, 1.0, None)
    assert first.experts[1].positive_prompts == ["SORT:bagbh=", "SORT:fhhaa=", "SORT:bebd=", "SORT:bgbij="]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4

    # the best recipe, merged again from its file by `evomerge merge`, scores what the study recorded for the live,
    # re-materialized MoE; best_model/ is that MoE, with its card
    best = study.best_trial
    assert load_recipe(run / "best_recipe.yaml") == parse_recipe(best.user_attrs["recipe"])
    assert main(["-q", "merge", str(run / "best_recipe.yaml"), "--out", str(tmp_path / "merged"), "--device",
                 "cpu"]) == 0
    spec = yaml.safe_load(config.read_text())["evaluator"]
    evaluator = build_evaluator({**spec, "include_path": [str(mini_zoo.task_dir)]})
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "MixtralForCausalLM"
    rescored = evaluator.score(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"))
    assert rescored.objective == best.value
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), AutoModelForCausalLM.from_pretrained(
        run / "best_model").state_dict().values()))
    assert "- moe" in (run / "best_model" / "README.md").read_text()
    assert f"test:{best.number}" in study.user_attrs and "| mergekit-moe | #0 |" in \
        (run / "report" / "summary.md").read_text()
    assert (run / "report" / "layers.png").is_file()  # the best MoE's router scale and dense layers

    # the same seed in another run dir: the same proposals (resuming is the common path of every space kind)
    again = tmp_path / "again"
    assert main(["-q", "search", str(config), "--n-trials", "1", "--out", str(again), "--no-export"]) == 0
    assert [t.params for t in optuna.load_study(study_name="moe_search", storage=f"sqlite:///{again / 'study.db'}")
            .get_trials()] == [t.params for t in trials[:2]]


def _prompted(experts: list[str]) -> list[dict]:
    return [{"model": e, "positive_prompts": ["a b", "c d"]} for e in experts]


BAD_RUNS = [  # (template keys, space keys, run config keys, message)
    ({"experts_per_token": 4}, {}, {}, "experts_per_token is 4 but there are only 3 experts"),
    ({"gate_mode": "hidden", "experts": lambda e: [*_prompted(e[:1]), {"model": e[1]}, *_prompted(e[2:])]}, {}, {},
     "gate_mode 'hidden' computes each router row from the expert's prompts, but experts [1] have an empty "
     "positive_prompts list"),
    ({}, {"experts_per_token": {"choice": [1, 4]}}, {},
     "moe space: experts_per_token takes values in [1, 3] here (3 experts), got [4]"),
    ({}, {"layer_groups": 3}, {}, "moe space: layer_groups 3 > the model's 2 layers"),
    ({"dense_layers": {"layers": [2]}}, {}, {}, "dense_layers.layers names layer 2, but the base has 2 layers"),
    ({}, {"prompts": 1}, {}, "but the template's gate_mode 'random' uses no prompts"),
    ({}, None, {"space": str(REPO / "search_spaces" / "task_arithmetic.yaml")},
     "task_arithmetic.yaml: the run config's template is an MoE template, but this is a merge space"),
    (None, {}, {}, "an MoE space (kind: moe) searches around an MoE template: set 'template' in the run config"),
    ({}, {}, {"sources": ["a"]}, "config: template: an MoE search takes its base and experts from the template; "
     "remove 'base' and 'sources'"),
    ({}, {}, {"templte": "x"}, "templte: unknown key (did you mean 'template'?)"),
    ({"kind": None, "method": "linear", "sources": lambda e: [{"model": m} for m in e], "experts": None,
      "gate_mode": None}, {}, {}, "a merge recipe; an MoE search's template is an MoE recipe (kind: moe)"),
]


def test_report_rows_of_an_moe_recipe_are_its_per_layer_choices() -> None:
    recipe = MoeRecipe(base="b", gate_mode="random", experts=[{"model": "/m/x"}, {"model": "/m/y"}],
                       router_scale=[1.0, 3.0], dense_layers={"layers": [2], "weights": [0.25, 0.75]})
    labels, matrix = moe_layer_table(recipe, num_layers=3)
    assert labels == ["router_scale", "dense", "x: dense weight", "y: dense weight"]
    expected = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [math.nan, math.nan, 0.25], [math.nan, math.nan, 0.75]]
    assert np.array_equal(matrix, np.array(expected), equal_nan=True)


@pytest.mark.parametrize(("template_keys", "space_keys", "run_keys", "message"), BAD_RUNS)
def test_bad_moe_search_configs_are_one_line_before_any_model_loads(
        tiny_llamas: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        template_keys: dict | None, space_keys: dict | None, run_keys: dict, message: str) -> None:
    base, *experts = tiny_llamas
    run: dict = {"name": "bad", "space": "space.yaml", "n_trials": 2, "out": "run", "device": "cpu",
                 "evaluator": {"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]}}
    if template_keys is None:  # a plain merge run (base and sources) given the MoE space
        run |= {"base": base, "sources": experts}
    else:
        data = {"kind": "moe", "base": base, "gate_mode": "random", "experts": _prompted(experts)}
        for key, value in template_keys.items():
            data[key] = value(experts) if callable(value) else value
        (tmp_path / "template.yaml").write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
        run["template"] = "template.yaml"
    if space_keys is not None:
        (tmp_path / "space.yaml").write_text(yaml.safe_dump({"kind": "moe", "layer_groups": 2,
                                                             "experts_per_token": {"choice": [1, 2]}} | space_keys))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run | run_keys))
    monkeypatch.setattr(torch.nn.Module, "to", lambda *_: pytest.fail("a model was built"))
    assert main(["search", str(tmp_path / "run.yaml")]) == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_worker_joins_an_moe_search_from_the_config_its_study_stores(tiny_llamas: list[str], tmp_path: Path) -> None:
    base, *experts = tiny_llamas
    (tmp_path / "template.yaml").write_text(yaml.safe_dump({"kind": "moe", "base": base, "gate_mode": "random",
                                                            "experts": [{"model": e} for e in experts]}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"kind": "moe", "router_scale": {"low": 0.5, "high": 2.0},
                                                         "experts_per_token": {"choice": [1, 2]}}))
    config = RunConfig(name="w", template=str(tmp_path / "template.yaml"), space=str(tmp_path / "space.yaml"),
                       evaluator={"type": "callable", "function": "search_fitness:norm_sum"}, n_trials=2,
                       out=str(tmp_path / "run"), device="cpu")
    run_search(config, progress=False, export=False)
    run_worker(config.storage_url, "w", n_trials=4, progress=False)
    trials = optuna.load_study(study_name="w", storage=config.storage_url).get_trials()
    assert [t.user_attrs["kind"] for t in trials] == ["baseline:mergekit-moe"] + ["search"] * 4
    assert all(t.state == TrialState.COMPLETE and isinstance(parse_recipe(t.user_attrs["recipe"]), MoeRecipe)
               for t in trials)


def test_an_moe_template_takes_the_place_of_base_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluator = {"type": "callable", "function": "search_fitness:norm_sum"}
    with pytest.raises(ValueError, match="template: an MoE search takes its base and experts from the template; "
                                         "remove 'base' and 'sources'"):
        RunConfig(name="t", template="t.yaml", sources=["a"], evaluator=evaluator)
    with pytest.raises(ValueError, match=r"sources: list the models to merge \(or, for an MoE search, give 'template'"):
        RunConfig(name="t", evaluator=evaluator)
    (tmp_path / "models").mkdir()
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
    (tmp_path / "models" / "t.yaml").write_text("kind: moe\nbase: base\ngate_mode: random\nexperts_per_token: 1\n"
                                                  "experts: [{model: a}]\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"name": "t", "template": "models/t.yaml",
                                                       "evaluator": evaluator}))
    monkeypatch.chdir(tmp_path)  # the template's model paths are a recipe's: taken from the working directory
    moe = RunConfig.from_yaml(tmp_path / "run.yaml").moe_template()
    assert moe is not None and (moe.base, moe.experts[0].model) == (str(tmp_path / "base"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="an MoE template is searched with `evomerge search`"):
        run_soup(RunConfig.from_yaml(tmp_path / "run.yaml", out=str(tmp_path / "soup")))


@pytest.mark.slow
def test_moe_benchmark_quick_writes_its_tables(mini_zoo, tmp_path) -> None:  # noqa: ANN001
    """``benchmarks/moe.py --quick`` (one seed, one trial per search) runs end to end and writes every row."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "moe.py"
    subprocess.run([sys.executable, str(script), "--quick", "--seeds", "1", "--trials", "1", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    rows = list(csv.DictReader(open(tmp_path / "moe.csv")))
    methods = [r["method"] for r in rows]
    assert methods == [f"expert {t}" for t in mini_zoo.experts] + ["dense merge (searched)",
                                                                    "MoE, mergekit-moe defaults", "MoE (searched)"]
    moe_params = {r["method"]: int(r["params"]) for r in rows}
    layers, hidden, inter, experts = 2, 64, 176, 4  # the mini zoo's Llama: each expert adds an MLP, each layer a router
    assert moe_params["MoE (searched)"] - moe_params["dense merge (searched)"] == \
        layers * ((experts - 1) * 3 * hidden * inter + experts * hidden)
    assert all(0 <= float(r["test_mean"]) <= 1 for r in rows)
    assert "| MoE (searched) | 1 |" in (tmp_path / "moe.md").read_text()


# ------------------------------------------------------------------------- template paths, seed and dtype
def _paths_layout(tiny_llamas: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """``work/models/{base,a,b}`` (links to tiny Llamas) and, elsewhere, ``files/`` with a template naming them
    relative to ``work`` and a run config naming the template and its space relative to itself."""
    base, a, b, _ = tiny_llamas
    work, files = tmp_path / "work", tmp_path / "files"
    (work / "models").mkdir(parents=True)
    files.mkdir()
    for name, path in (("base", base), ("a", a), ("b", b)):
        (work / "models" / name).symlink_to(path)
    (files / "template.yaml").write_text(yaml.safe_dump({"kind": "moe", "base": "models/base", "gate_mode": "random",
                                                         "experts_per_token": 1,
                                                         "experts": [{"model": "models/a"}, {"model": "models/b"}]}))
    (files / "space.yaml").write_text(yaml.safe_dump({"kind": "moe", "router_scale": {"low": 0.5, "high": 2.0}}))
    (files / "run.yaml").write_text(yaml.safe_dump({
        "name": "p", "template": "template.yaml", "space": "space.yaml", "n_trials": 1, "out": "run", "device": "cpu",
        "evaluator": {"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]}}))
    return work, files


def test_a_templates_model_paths_are_a_recipes_in_search_and_merge_alike(
        tiny_llamas: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One rule in both commands: a recipe file's relative model paths (a search's template too) are taken from the
    working directory, as every recipe's are in `evomerge merge` and as mergekit reads its configs; the paths a run
    config names (template, space, out) are relative to the run config. Run from a third directory, both commands
    read the same models; from another, both refuse in one line naming where they looked."""
    work, files = _paths_layout(tiny_llamas, tmp_path)
    monkeypatch.chdir(work)
    assert main(["-q", "merge", str(files / "template.yaml"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["-q", "search", str(files / "run.yaml"), "--no-export"]) == 0
    trials = optuna.load_study(study_name="p", storage=f"sqlite:///{files / 'run' / 'study.db'}").get_trials()
    baseline = parse_recipe(trials[0].user_attrs["recipe"])  # the template as mergekit-moe builds it, paths absolute
    assert isinstance(baseline, MoeRecipe) and trials[0].user_attrs["kind"] == "baseline:mergekit-moe"
    assert [baseline.base, *(e.model for e in baseline.experts)] == \
        [str((work / "models" / n).resolve()) for n in ("base", "a", "b")]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    live = MoeModel(baseline, device="cpu").state_dict()
    assert merged.keys() == live.keys() and all(torch.equal(merged[n], live[n]) for n in merged)

    monkeypatch.chdir(files)  # models/ is not here
    capsys.readouterr()
    where = f"(relative paths in a recipe are taken from the working directory, {files})"
    assert main(["merge", str(files / "template.yaml"), "--out", str(tmp_path / "again")]) == 2
    assert where in one_line(capsys) and not (tmp_path / "again").exists()
    assert main(["search", str(files / "run.yaml"), "--out", str(tmp_path / "run2")]) == 2
    line = one_line(capsys)
    assert "no model dir models/base" in line and where in line and not (tmp_path / "run2").exists()


def test_a_templates_seed_and_dtype_hold_unless_the_run_sets_them_and_a_conflict_is_one_line(
        tiny_llamas: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work, files = _paths_layout(tiny_llamas, tmp_path)
    monkeypatch.chdir(work)
    template = yaml.safe_load((files / "template.yaml").read_text())
    run = yaml.safe_load((files / "run.yaml").read_text())

    def config(template_keys: dict, run_keys: dict, **overrides: object) -> RunConfig:
        (files / "template.yaml").write_text(yaml.safe_dump(template | template_keys))
        (files / "run.yaml").write_text(yaml.safe_dump(run | run_keys))
        return RunConfig.from_yaml(files / "run.yaml", **overrides)

    held = config({"seed": 5, "dtype": "bfloat16"}, {})
    assert (held.seed, held.dtype) == (5, "bfloat16")  # the run config sets neither: the template's hold
    assert RunConfig.model_validate(held.model_dump(mode="json")) == held  # a worker's copy of the stored config
    assert (config({}, {"seed": 3}).seed, config({}, {}).seed, config({}, {}).dtype) == (3, 0, None)
    assert config({"seed": 5}, {"seed": 5}).seed == 5  # both set, the same value
    for template_keys, run_keys, overrides, message in [
        ({"seed": 5}, {"seed": 3}, {}, "seed: the run sets 3, its template"),
        ({"seed": 5}, {}, {"seed": 4}, "seed: the run sets 4, its template"),  # `evomerge search --seed 4`
        ({"dtype": "bfloat16"}, {"dtype": "float32"}, {}, "dtype: the run sets float32, its template"),
    ]:
        with pytest.raises(ConfigError) as err:
            config(template_keys, run_keys, **overrides)
        text = str(err.value)
        assert message in text and "remove" in text and str(files / "template.yaml") in text and "\n" not in text
        assert f"sets {template_keys.get('seed', template_keys.get('dtype'))}: remove" in text

    # the recipes a search scores carry the template's seed and dtype
    config({"seed": 5, "dtype": "bfloat16"}, {})
    assert main(["-q", "search", str(files / "run.yaml"), "--no-export"]) == 0
    trials = optuna.load_study(study_name="p", storage=f"sqlite:///{files / 'run' / 'study.db'}").get_trials()
    assert [(r.seed, r.dtype) for r in (parse_recipe(t.user_attrs["recipe"]) for t in trials)] == \
        [(5, "bfloat16")] * len(trials) and len(trials) == 2
