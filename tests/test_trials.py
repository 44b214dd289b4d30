"""The study-record schema (evomerge.search.trials) reads the studies evomerge has always written.

The study below is written with the attribute keys spelled out literally, as evomerge wrote them before the schema
module existed: renaming a key in the schema makes this test fail instead of silently losing a study's data."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
from optuna.distributions import BaseDistribution
from optuna.trial import FixedTrial, TrialState
from tiny_models import tiny_family

from evomerge.search import trials as records
from evomerge.search.config import RunConfig
from evomerge.search.space import ModelSet, SearchSpace
from evomerge.search.study import run_search

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
OLD_BEST = 1e6  # above any norm sum of the tiny models: the old trial stays the best after the resume


def test_a_study_written_with_the_old_keys_resumes_and_reports(tmp_path):
    base_path, ft_paths = tiny_family(tmp_path / "family", n=2)
    base, fts = str(base_path), [str(p) for p in ft_paths]
    cfg = RunConfig.model_validate(dict(
        name="old", base=base, sources=fts, space=str(SPACES / "task_arithmetic.yaml"), sampler="random",
        evaluator={"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]},
        n_trials=3, out=str(tmp_path / "run"), device="cpu", seed=1, baselines=False))
    space = SearchSpace.from_yaml(cfg.space)
    params = {"weight/s0": 0.25, "weight/s1": 0.75, "lambda": 1.0}  # the names of naming version 1
    distributions = _distributions(space, fts, base)
    assert set(params) == set(distributions)
    recipe = space.suggest(FixedTrial(params), ModelSet(base=base, sources=fts, num_layers=2), naming=1)
    recipe = recipe.model_copy(update={"seed": cfg.seed, "dtype": cfg.dtype}).model_dump(mode="json")

    Path(cfg.out).mkdir(parents=True)
    study = optuna.create_study(storage=cfg.storage_url, study_name="old", direction="maximize")
    for key, value in {"config": cfg.model_dump(mode="json"), "num_layers": 2, "sources": fts, "base": base,
                       "kind": "search", "space": "task_arithmetic.yaml", "objective": ["norm_sum"],
                       "baselines_enqueued": True,
                       "reference:outside": {"recipe": recipe, "metrics": {"norm_sum": 7.5}, "values": [7.5],
                                             "merge_seconds": 0.125, "eval_seconds": 0.0625}}.items():
        study.set_user_attr(key, value)
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=distributions, value=OLD_BEST,
        user_attrs={"recipe": recipe, "kind": "search", "metrics": {"norm_sum": OLD_BEST}, "merge_seconds": 0.5,
                    "eval_seconds": 0.25}))
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=distributions, state=TrialState.FAIL,
        user_attrs={"recipe": recipe, "kind": "baseline:uniform", "error": "RuntimeError: planted old failure"}))

    summary = run_search(cfg, progress=False, export=False)

    trials = optuna.load_study(study_name="old", storage=cfg.storage_url).get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3  # one old trial + two new: resumed
    assert summary["best_trial"] == 0 and summary["best_value"] == OLD_BEST
    assert records.recipe_of(trials[0]).model_dump(mode="json") == recipe
    assert records.trial_metrics(trials[0]) == {"norm_sum": OLD_BEST}
    assert records.trial_error(trials[1]) == "RuntimeError: planted old failure"
    assert records.trial_kind(trials[1]) == "baseline:uniform" and records.is_baseline(trials[1])
    for new in trials[2:]:  # the new trials are written with the same keys
        metrics = new.user_attrs["metrics"]
        assert set(new.user_attrs) == {"recipe", "kind", "metrics", "merge_seconds", "eval_seconds",
                                       *(f"val/{m}" for m in metrics)}
        assert {m: new.user_attrs[f"val/{m}"] for m in metrics} == metrics
        assert new.user_attrs["metrics"]["norm_sum"] == pytest.approx(new.value)
        assert set(new.params) == set(params)  # and keep the old study's parameter names
    attrs = optuna.load_study(study_name="old", storage=cfg.storage_url).user_attrs
    assert "param_naming" not in attrs  # a resumed study keeps its description: version 1 (index names)
    # the final test scoring re-merged the old recipe: the true norm sum of base + 0.25 τ0 + 0.75 τ1
    true_value = attrs["test:0"]["objective"]
    assert attrs["test:0"]["metrics"]["norm_sum"] == true_value != OLD_BEST
    assert attrs["reference:outside"]["test_objective"] == pytest.approx(true_value)
    assert attrs["reference:outside"]["values"] == [7.5]

    report = Path(summary["report"]).read_text()
    assert f"| best (search) | #0 | 1e+06 | {true_value:.3f} |" in report
    assert f"| outside (linear, outside the space) | — | 7.500 | {true_value:.3f} |" in report
    assert "- #1 (uniform): RuntimeError: planted old failure" in report
    assert "kind search, space task_arithmetic.yaml" in report
    with open(Path(summary["report"]).parent / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["val norm_sum"] == "1000000.0" and rows[0]["merge s"] == "0.5" and rows[0]["eval s"] == "0.25"
    assert rows[1]["kind"] == "baseline:uniform" and rows[1]["error"] == "RuntimeError: planted old failure"


def _distributions(space: SearchSpace, fts: list[str], base: str) -> dict[str, BaseDistribution]:
    """The distribution of every parameter the space suggests, recorded through a trial of a study in memory."""
    trial = optuna.create_study().ask()
    space.suggest(trial, ModelSet(base=base, sources=fts, num_layers=2), naming=1)
    return dict(trial.distributions)
