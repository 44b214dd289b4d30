"""The search loop end to end on tiny models with a callable fitness: trials, baselines, failures, resume, seeds."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml
from tiny_models import tiny_family
from transformers import AutoModelForCausalLM

from evomerge.recipe import load_recipe, parse_recipe
from evomerge.report import trials_dataframe
from evomerge.search.config import RunConfig
from evomerge.search.study import objective_labels, run_search, run_soup, trial_plan

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("search-family"), n=3)
    return str(base), [str(f) for f in fts]


def config(family, tmp_path: Path, **kw) -> RunConfig:
    base, fts = family
    data = dict(name="t", base=base, sources=fts, space=str(SPACES / "task_arithmetic.yaml"),
                evaluator={"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]},
                n_trials=6, out=str(tmp_path / "run"), device="cpu", seed=1)
    return RunConfig.model_validate({**data, **kw})


def load(cfg: RunConfig) -> optuna.Study:
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


def test_search_stores_trials_baselines_and_outputs(family, tmp_path, caplog):
    cfg = config(family, tmp_path)
    with caplog.at_level("INFO", logger="evomerge.search.study"):
        summary = run_search(cfg, progress=False)
    assert "6 searched trials + 5 baselines" in caplog.messages  # printed at start
    study = load(cfg)
    trials = study.get_trials()
    kinds = [t.user_attrs["kind"] for t in trials]
    # n_trials: 6 searched trials, the baselines on top (3 sources alone, uniform, defaults)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 11
    assert kinds.count("search") == 6 and len(kinds) == 6 + 5
    # baselines first: each source alone, the uniform average, the method defaults
    assert kinds[:3] == [f"baseline:source:{Path(p).name}" for p in family[1]] or kinds[0].startswith("baseline")
    assert any(k == "baseline:uniform" for k in kinds)
    for t in trials:
        recipe = parse_recipe(t.user_attrs["recipe"])
        assert recipe.method == "task_arithmetic"
        assert t.value == pytest.approx(t.user_attrs["metrics"]["norm_sum"])
    best = max(trials, key=lambda t: t.value)
    assert summary["best_trial"] == best.number
    # a new study: the parameters are named for what they are (naming version 2)
    assert study.user_attrs["param_naming"] == 2
    assert set(best.params) == {"lambda", *(f"weight[{Path(p).name}]" for p in family[1])}
    run = Path(cfg.out)
    assert load_recipe(run / "best_recipe.yaml") == parse_recipe(best.user_attrs["recipe"])
    assert yaml.safe_load((run / "best_recipe.mergekit.yaml").read_text())["merge_method"] == "task_arithmetic"
    # the exported model is the best recipe: its fitness equals the best value
    exported = AutoModelForCausalLM.from_pretrained(run / "best_model")
    assert float(exported.model.norm.weight.double().sum()) == pytest.approx(best.value, rel=1e-6)
    # test-split scores of the best and of every baseline
    tested = {int(k.split(":")[1]) for k in study.user_attrs if k.startswith("test:")}
    assert best.number in tested
    # best_model's card names the study and trial and shows the best trial's validation and test scores
    card = (run / "best_model" / "README.md").read_text()
    test_value = study.user_attrs[f"test:{best.number}"]["metrics"]["norm_sum"]
    assert f"study `{cfg.name}`, trial #{best.number}" in card
    assert f"| norm_sum | {best.value:.3f} | {test_value:.3f} |" in card
    assert load_recipe(run / "best_model" / "recipe.yaml") == load_recipe(run / "best_recipe.yaml")
    assert {t.number for t in trials if t.user_attrs["kind"].startswith("baseline")} <= tested
    assert (run / "report" / "summary.md").is_file()
    # Optuna's own dataframe names the objective and holds every validation metric as a column; evomerge's adds the
    # test scores, which the study keeps (finished trials are read-only)
    assert study.metric_names == ["norm_sum"]
    frame = study.trials_dataframe()
    complete = frame[frame["state"] == "COMPLETE"]
    assert list(complete["value_norm_sum"]) == pytest.approx(list(complete["user_attrs_val/norm_sum"]))
    assert frame.sort_values("user_attrs_val/norm_sum", ascending=False)["number"].iloc[0] == best.number
    frame = trials_dataframe(study)
    tested_frame = frame.dropna(subset=["test/objective"])
    assert set(tested_frame["number"]) == tested
    for number, value, norm_sum in zip(tested_frame["number"], tested_frame["test/objective"],
                                       tested_frame["test/norm_sum"]):
        assert value == norm_sum == study.user_attrs[f"test:{number}"]["objective"]


def test_config_callbacks_see_every_trial(family, tmp_path):
    import recording_callbacks

    recording_callbacks.SEEN.clear()
    recording_callbacks.LOGGED.clear()
    cfg = config(family, tmp_path, n_trials=2, baselines=False, callbacks=["recording_callbacks:recorder"])
    run_search(cfg, progress=False, export=False)
    trials = load(cfg).get_trials()
    assert recording_callbacks.SEEN == [(t.number, t.state.name, t.value) for t in trials]
    assert len(recording_callbacks.SEEN) == 2
    # what a tracker logs (README "Tracking with MLflow or W&B"): the parameters, every metric, the recipe
    assert recording_callbacks.LOGGED == [(t.params, t.user_attrs) for t in trials]
    for params, attrs in recording_callbacks.LOGGED:
        assert params and "recipe" in attrs and any(key.startswith("val/") for key in attrs), sorted(attrs)


@pytest.mark.parametrize(("entry", "message"), [
    ("recording_callbacks", "write 'module:factory'"),
    ("no_such_module_xyz:f", "No module named 'no_such_module_xyz'; is the module installed or on PYTHONPATH?"),
    ("recording_callbacks:missing", "has no attribute 'missing'"),
    ("recording_callbacks:not_a_factory", "not_a_factory() returned int 3, not a callback"),
])
def test_bad_callbacks_entry_fails_before_any_study(family, tmp_path, entry, message):
    cfg = config(family, tmp_path, callbacks=[entry])
    with pytest.raises(ValueError, match=re.escape(f"callbacks entry {entry!r}: ")) as err:
        run_search(cfg, progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (Path(cfg.out) / "study.db").exists()


def test_trial_plan_line():
    assert trial_plan(40, 6, 0) == "40 searched trials + 6 baselines"
    assert trial_plan(40, 1, 2, done=12) == ("40 searched trials + 1 baseline (+ 2 references outside the space, "
                                             "scored beside the study); 12 searched already")


def test_objective_labels_name_the_mean_that_makes_the_objective():
    assert objective_labels(["zoo_add/acc"], None, 1) == ["zoo_add/acc"]
    assert objective_labels(["a/acc", "b/acc"], None, 1) == ["mean(a/acc, b/acc)"]
    assert objective_labels(["a/acc", "b/acc"], (0.75, 0.25), 1) == ["weighted mean(0.75 a/acc, 0.25 b/acc)"]
    assert objective_labels(["a/acc", "b/acc"], (0.75, 0.25), 2) == ["a/acc", "b/acc"]


def test_source_alone_baseline_reproduces_the_source(family, tmp_path, caplog):
    cfg = config(family, tmp_path, n_trials=3)
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    optuna.logging.enable_propagation()  # Optuna's log lines reach caplog
    try:
        with caplog.at_level("INFO", logger="optuna"):
            run_search(cfg, progress=True, export=False)
        # the progress bar replaces Optuna's per-trial INFO line (which repeats every parameter); level restored
        assert not [r for r in caplog.records if "finished with value" in r.getMessage()]
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.disable_propagation()
        optuna.logging.set_verbosity(before)
    study = load(cfg)
    from search_fitness import norm_sum
    for t in study.get_trials():
        kind = t.user_attrs["kind"]
        if kind.startswith("baseline:source:"):
            path = next(p for p in family[1] if Path(p).name == kind.rsplit(":", 1)[1])
            model = AutoModelForCausalLM.from_pretrained(path)
            assert t.value == pytest.approx(norm_sum(model, None)["norm_sum"], rel=1e-6)


def test_resume_and_same_seed_same_proposals(family, tmp_path):
    first = config(family, tmp_path / "a", n_trials=5)
    run_search(first, progress=False, export=False)
    before = [t.params for t in load(first).get_trials()]
    resumed = config(family, tmp_path / "a", n_trials=7)
    run_search(resumed, progress=False, export=False)
    after = load(resumed).get_trials()
    assert len(after) == 7 + 5 and [t.params for t in after[:10]] == before  # 5 baselines on top
    again = config(family, tmp_path / "b", n_trials=5)
    run_search(again, progress=False, export=False)
    assert [t.params for t in load(again).get_trials()] == before


def test_failed_evaluation_becomes_a_failed_trial(family, tmp_path):
    import search_fitness

    search_fitness.CALLS["n"] = 0
    cfg = config(family, tmp_path, n_trials=4, baselines=False,
                 evaluator={"type": "callable", "function": "search_fitness:fails_on_third_call"})
    run_search(cfg, progress=False, export=False)
    trials = load(cfg).get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "planted evaluation failure" in failed[0].user_attrs["error"]
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 4


def test_bad_config_fails_before_any_study(family, tmp_path):
    with pytest.raises(ValueError, match="has no attribute .nope"):
        run_search(config(family, tmp_path, evaluator={"type": "callable", "function": "search_fitness:nope"}),
                   progress=False)
    assert not (tmp_path / "run" / "study.db").exists()


def test_soup_greedy_and_uniform(family, tmp_path):
    base, fts = family
    cfg = config(family, tmp_path, base=None, space=None, name="soup")
    summary = run_soup(cfg, progress=False, export=False)
    study = load(cfg)
    kinds = {t.user_attrs["kind"]: t.value for t in study.get_trials()}
    individual = {k.rsplit(":", 1)[1]: v for k, v in kinds.items() if k.startswith("baseline:source:")}
    assert set(individual) == {Path(p).name for p in fts}
    assert "baseline:uniform" in kinds
    # the norm sum is linear in the weights: a soup's score is the mean of its members' scores, so the greedy
    # soup keeps exactly the best ingredient (any other member lowers the mean)
    assert summary["kept"] == [max(individual, key=individual.get)]
    expected_uniform = sum(individual.values()) / 3
    assert kinds["baseline:uniform"] == pytest.approx(expected_uniform, rel=1e-6)
    # the report names the greedy soup and what it kept; its test score was taken
    kept = summary["kept"][0]
    assert f"| greedy soup (kept 1 of 3: {kept}) | #{summary['greedy_trial']} |" in Path(summary["report"]).read_text()
    assert f"test:{summary['greedy_trial']}" in study.user_attrs
    again = run_soup(cfg, progress=False, export=False)  # resume: nothing is scored twice
    assert len(load(cfg).get_trials()) == len(study.get_trials()) and again["kept"] == summary["kept"]


def test_layer_stacking_search(family, tmp_path):
    """The passthrough space changes the layer count: each candidate is a new model, scored like the others."""
    cfg = config(family, tmp_path, base=None, space=str(SPACES / "layer_stacking.yaml"), n_trials=4)
    run_search(cfg, progress=False)
    trials = [t for t in load(cfg).get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) >= 4
    for t in trials:
        recipe = parse_recipe(t.user_attrs["recipe"])
        assert recipe.method == "passthrough"
    best = max(trials, key=lambda t: t.value)
    recipe = parse_recipe(best.user_attrs["recipe"])
    exported = AutoModelForCausalLM.from_pretrained(Path(cfg.out) / "best_model")
    assert exported.config.num_hidden_layers == sum(s.layer_range[1] - s.layer_range[0] for s in recipe.slices)
    assert float(exported.model.norm.weight.double().sum()) == pytest.approx(best.value, rel=1e-6)


def test_successive_halving_prunes_on_fidelity_levels(family, tmp_path):
    cfg = config(family, tmp_path, n_trials=10, pruner="halving", fidelities=[0.25, 1.0], sampler="random",
                 evaluator={"type": "callable", "function": "search_fitness:noisy_by_fidelity"})
    run_search(cfg, progress=False, export=False)
    trials = load(cfg).get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned, "successive halving should stop some trials at the first fidelity"
    assert all(list(t.intermediate_values) == [1] for t in pruned)
    for t in complete:  # the value reported at fidelity 0.25 is the full score minus 0.75
        if t.user_attrs["kind"] == "search":
            assert t.intermediate_values[1] == pytest.approx(t.value - 0.75)
        else:  # baselines are never pruned: scored once, in full
            assert t.intermediate_values == {}
    assert len(pruned) + len([t for t in complete if t.user_attrs["kind"] == "search"]) == 10


def test_lower_is_better_objective_is_minimized(family, tmp_path):
    """A lower-is-better evaluator (perplexity-like) gives a minimizing study: the search exports its lowest trial
    and the greedy soup starts from the lowest-scoring ingredient."""
    minimize = {"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"],
                "direction": "minimize"}
    cfg = config(family, tmp_path, evaluator=minimize)
    summary = run_search(cfg, progress=False, export=False)
    study = load(cfg)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    values = {t.number: t.value for t in study.get_trials() if t.value is not None}
    assert summary["best_trial"] == min(values, key=values.get)
    assert study.user_attrs["objective"] == ["norm_sum"]
    soup = config(family, tmp_path / "soup", base=None, space=None, name="soup", evaluator=minimize)
    result = run_soup(soup, progress=False, export=False)
    assert result["kept"] == [min(result["individual"], key=result["individual"].get)]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_an_l1_penalty_on_the_weights_is_folded_into_the_objective_in_the_study_direction(family, tmp_path,
                                                                                         direction):
    space = tmp_path / "penalized.yaml"
    space.write_text("method: task_arithmetic\nparameters:\n  weight: {low: -1.0, high: 1.0, layerwise: false}\n"
                     "penalty: {l1: 0.25}\n")
    evaluator = {"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"],
                 "direction": direction}
    cfg = config(family, tmp_path, space=str(space), evaluator=evaluator, n_trials=4, confirm_top=2,
                 confirm_evaluator=evaluator)
    summary = run_search(cfg, progress=False, export=False)
    complete = [t for t in load(cfg).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 + 5  # and the baselines (sources alone, uniform, defaults), penalized as well
    sign = 1.0 if direction == "maximize" else -1.0
    for t in complete:
        weights = [v for k, v in t.params.items() if k.startswith("weight[")]
        score = t.user_attrs["metrics"]["norm_sum"]
        assert len(weights) == 3 and t.user_attrs["score"] == score  # the unpenalized score stays on the trial
        assert t.value == pytest.approx(score - sign * 0.25 * sum(abs(w) for w in weights), rel=0, abs=1e-12)
    assert any(abs(t.value - t.user_attrs["score"]) > 0.01 for t in complete)
    # the best is the best penalized trial; its confirmation (the same function) ranks with the penalty too
    assert summary["best_trial"] == max(complete, key=lambda t: (sign * t.value, -t.number)).number
    for number, value in summary["confirmed"].items():
        assert value == pytest.approx(next(t.value for t in complete if t.number == int(number)), abs=1e-12)
    report = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "L1 penalty on the weights folded in" in report and "val score (unpenalized)" in report
    assert "score (unpenalized),penalty" in (tmp_path / "run" / "report" / "trials.csv").read_text()
    with pytest.raises(ValueError, match="multi_objective run has several: drop the space's penalty"):
        run_search(config(family, tmp_path / "multi", space=str(space), multi_objective=True,
                          evaluator={"type": "callable", "function": "search_fitness:norm_sum"}), progress=False)


def test_confirm_top_rescores_the_best_and_picks_among_them_by_the_confirmation(family, tmp_path):
    import search_fitness

    confirm = {"type": "callable", "function": "search_fitness:neg_norm_sum"}
    cfg = config(family, tmp_path, n_trials=8, confirm_top=3, confirm_evaluator=confirm)
    search_fitness.CALLS["confirm"] = 0
    summary = run_search(cfg, progress=False)
    study = load(cfg)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    top3 = sorted(complete, key=lambda t: (-t.values[0], t.number))[:3]
    assert summary["confirmed"].keys() == {str(t.number) for t in top3}
    for t in top3:  # the confirmation score is the confirmation evaluator's own (here minus the search's)
        assert summary["confirmed"][str(t.number)] == pytest.approx(-t.values[0])
    chosen = min(top3, key=lambda t: t.values[0])  # the confirmation reverses the order: the third best wins
    assert summary["best_trial"] == chosen.number != top3[0].number
    assert load_recipe(tmp_path / "run" / "best_recipe.yaml") == parse_recipe(chosen.user_attrs["recipe"])
    assert "Chosen among the 3 best" in (tmp_path / "run" / "report" / "summary.md").read_text()
    assert search_fitness.CALLS["confirm"] == 3
    run_search(cfg, progress=False, export=False)  # resumed: the budget is spent, the re-scores are kept
    assert search_fitness.CALLS["confirm"] == 3


def test_confirm_top_refuses_configs_where_it_cannot_change_anything(family, tmp_path):
    with pytest.raises(ValueError, match="the evaluator has no `limit`: the scores would not change"):
        config(family, tmp_path, confirm_top=2)
    with pytest.raises(ValueError, match="does not apply to a multi_objective search"):
        config(family, tmp_path, confirm_top=2, multi_objective=True, confirm_evaluator={"type": "callable"})
    lm_eval = {"type": "lm_eval", "tasks": ["t"], "limit": 5, "split": "validation"}
    assert config(family, tmp_path, confirm_top=2, evaluator=lm_eval).confirm_spec() == {
        "type": "lm_eval", "tasks": ["t"], "split": "validation"}
