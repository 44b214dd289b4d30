"""The MoE search space (names, assembled recipes, baseline, checks) and a short search over the mini zoo's experts
with one live MoE (re-materialized per trial; the best recipe rebuilt from scratch scores the same)."""

from __future__ import annotations

import json
import math
import re

import optuna
import pytest
import torch

from evomerge.evaluate.base import EvalResult, Objective
from evomerge.moe import MoeModel
from evomerge.recipe import MoeRecipe
from evomerge.search.moe_space import MoeSpace
from evomerge.search.moe_study import best_moe_recipe, search_moe
from evomerge.search.space import RangeSpec, SpaceError

SPACE = {"layer_groups": 2, "experts_per_token": {"choice": [1, 2, 3]},
         "router_scale": {"low": 0.25, "high": 4.0, "log": True}, "random_weight": {"low": 0.0, "high": 0.5},
         "dense": {"choice": [False, True]}, "dense_method": "task_arithmetic", "dense_weight": {"low": 0.0,
                                                                                                 "high": 1.0},
         "prompts": 2}


def template(paths: list[str], prompts: int = 4) -> MoeRecipe:
    base, *experts = paths
    return MoeRecipe(base=base, gate_mode="random", experts_per_token=2, seed=1,
                     experts=[{"model": e, "positive_prompts": [f"{i}-{k}" for k in range(prompts)]}
                              for i, e in enumerate(experts)])


def test_suggestions_are_named_for_what_they_are_and_assemble_the_recipe(tiny_llamas: list[str]) -> None:
    space = MoeSpace.model_validate(SPACE)
    moe = template(tiny_llamas)
    params = {"experts_per_token": 3, "random_weight": 0.2, "router_scale[layer 0]": 0.5, "router_scale[layer 1]": 2.0,
              "dense[layer 0]": False, "dense[layer 1]": True, "dense_weight[ft0]": 0.1, "dense_weight[ft1]": 0.2,
              "dense_weight[ft2]": 0.3, "prompts[ft0]": 2, "prompts[ft1]": 0, "prompts[ft2]": 2}
    recipe = space.suggest(optuna.trial.FixedTrial(params), moe, num_layers=2)
    assert (recipe.experts_per_token, recipe.random_weight, recipe.router_scale) == (3, 0.2, [0.5, 2.0])
    assert recipe.dense_layers is not None and recipe.dense_layers.layers == [1]
    assert (recipe.dense_layers.method, recipe.dense_layers.weights) == ("task_arithmetic", [0.1, 0.2, 0.3])
    assert [e.positive_prompts for e in recipe.experts] == [["0-2", "0-3"], ["1-0", "1-1"], ["2-2", "2-3"]]
    baseline = space.baseline_params(moe, num_layers=2)
    again = space.suggest(optuna.trial.FixedTrial(baseline), moe, num_layers=2)  # mergekit-moe's MoE
    assert again == moe.model_copy(update={"experts": [e.model_copy(update={"positive_prompts": e.positive_prompts[:2]})
                                                       for e in moe.experts]})
    assert MoeSpace.model_validate({"random_weight": {"low": 0.1, "high": 0.5}}).baseline_params(moe, 2) is None


@pytest.mark.parametrize(("space", "message"), [
    ({"experts_per_token": {"choice": [1, 4]}}, "experts_per_token takes values in [1, 3] here (3 experts), got [4]"),
    ({"random_weight": {"low": 0.0, "high": 1.5}}, "random_weight takes values in [0, 1] here (3 experts), got [1.5]"),
    ({"prompts": 5}, "prompts is 5 but experts [0, 1, 2] have fewer positive prompts"),
    ({"layer_groups": 3}, "layer_groups 3 > the model's 2 layers"),
    ({"router_scale": {"low": 0.5}}, "router_scale needs low and high"),
])
def test_bad_spaces_are_refused_before_any_trial(tiny_llamas: list[str], space: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=re.escape(message)):
        MoeSpace.model_validate(space).check(template(tiny_llamas), num_layers=2)


def test_the_shipped_space_loads_and_a_bad_file_is_one_line(tiny_llamas: list[str], tmp_path) -> None:  # noqa: ANN001
    from pathlib import Path

    shipped = MoeSpace.from_yaml(Path(__file__).resolve().parent.parent / "search_spaces" / "moe.yaml")
    shipped.model_copy(update={"prompts": 4}).check(template(tiny_llamas), num_layers=2)
    assert isinstance(shipped.router_scale, RangeSpec) and shipped.router_scale.log
    (tmp_path / "bad.yaml").write_text("kind: moe\nlayer_groups: 0\nrouter_scal: 1.0\n")
    with pytest.raises(SpaceError) as err:
        MoeSpace.from_yaml(tmp_path / "bad.yaml")
    assert "layer_groups: Input should be greater than or equal to 1" in str(err.value)
    assert "router_scal: Extra inputs are not permitted" in str(err.value) and "\n" not in str(err.value)


class LossEvaluator:
    """Mean next-token loss of a few zoo queries (minimized): a real score of the live model, cheap."""

    objective = Objective(("loss",), direction="minimize")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def check(self, model: object = None) -> None:
        return None

    def score(self, model: torch.nn.Module, tokenizer: object, *, fidelity: float = 1.0) -> EvalResult:
        batch = tokenizer(self.texts, return_tensors="pt", padding=True)  # type: ignore[operator]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.inference_mode():
            loss = float(model(**batch, labels=labels).loss)
        return EvalResult(metrics={"loss": loss}, objective=loss, objectives=[loss], items=None,
                          n_items=len(self.texts), seconds=0.0)


def test_search_rematerializes_one_live_moe_and_its_best_recipe_rebuilds(mini_zoo, quiet_optuna) -> None:  # noqa: ANN001
    tasks = list(mini_zoo.experts)
    queries = {t: [json.loads(line)["query"] for line in mini_zoo.split_file(t, "train").read_text().splitlines()[:4]]
               for t in tasks}
    moe = MoeRecipe(base=str(mini_zoo.base), gate_mode="cheap_embed",
                    experts=[{"model": str(mini_zoo.experts[t]), "positive_prompts": queries[t]} for t in tasks])
    space = MoeSpace.model_validate({"experts_per_token": {"choice": [1, 2]},
                                     "router_scale": {"low": 0.5, "high": 8.0, "log": True},
                                     "dense": {"choice": [False, True]}, "prompts": 2})
    texts = [json.loads(line)["query"] for t in tasks
             for line in mini_zoo.split_file(t, "validation").read_text().splitlines()[:3]]
    evaluator = LossEvaluator(texts)
    study, live = search_moe(moe, space, evaluator, n_trials=4, seed=0, device="cpu")
    trials = study.trials
    assert len(trials) == 4 and trials[0].user_attrs["kind"] == "baseline"
    first = MoeRecipe.model_validate(trials[0].user_attrs["recipe"])
    assert (first.experts_per_token, first.router_scale, first.dense_layers) == (2, 1.0, None)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) > 1
    best = best_moe_recipe(study)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mini_zoo.base)
    fresh = MoeModel(best, device="cpu")  # from scratch: the score the study recorded for the re-materialized MoE
    assert math.isclose(evaluator.score(fresh.model, tokenizer).objective, study.best_value, rel_tol=0, abs_tol=0)
    live.materialize(best)
    assert all(torch.equal(a, b) for a, b in zip(live.state_dict().values(), fresh.state_dict().values()))


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
