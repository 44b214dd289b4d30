"""Experiment tracking through the run config's ``callbacks:``: the README's MLflow example, run as written against a
local store, records one MLflow run per trial with its parameters and objective (skipped without mlflow, e.g. in CI,
whose test command installs the dev and distributed extras only; ``pip install -e '.[mlflow]'`` runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial
from search_fitness import search_settings
from tiny_models import tiny_family

from evomerge.search.config import RunConfig
from evomerge.search.tracking import tracker_name, tracker_trial

README = Path(__file__).resolve().parent.parent / "README.md"


def test_tracker_names_keep_the_parts_in_mlflows_characters():
    assert tracker_name("weight[expert_math][layers 8-15]") == "weight/expert_math/layers 8-15"
    assert (tracker_name("dare_ties/density[expert_math][mlp][layers 0-7]")
            == "dare_ties/density/expert_math/mlp/layers 0-7")
    assert tracker_name("t[self_attn][layer 3]") == "t/self_attn/layer 3"
    assert tracker_name("val/gsm8k/exact_match,strict-match") == "val/gsm8k/exact_match:strict-match"
    assert tracker_name("lambda") == "lambda" and tracker_name("weight[a+b]") == "weight/a_b"


def test_tracker_trial_renames_a_copy():
    trial = create_trial(state=TrialState.COMPLETE, value=1.0, params={"weight[m]": 0.5},
                         distributions={"weight[m]": FloatDistribution(0, 1)}, user_attrs={"val/t/acc,none": 0.25})
    renamed = tracker_trial(trial)
    assert isinstance(renamed, FrozenTrial) and renamed.number == trial.number and renamed.value == 1.0
    assert renamed.params == {"weight/m": 0.5} and list(renamed.distributions) == ["weight/m"]
    assert renamed.user_attrs == {"val/t/acc:none": 0.25}
    assert trial.params == {"weight[m]": 0.5} and trial.user_attrs == {"val/t/acc,none": 0.25}  # unchanged


def readme_tracking_module() -> str:
    """The README's ``# tracking.py`` example, as written there."""
    match = re.search(r"```python\n# tracking\.py\n(.*?)```", README.read_text(), re.S)
    assert match, "README: no ```python # tracking.py block"
    return match.group(1)


def test_the_readmes_mlflow_callback_logs_one_run_per_trial_quietly(tmp_path):
    """``evomerge search`` with the README's MLflow factory (a fresh process, as a user runs it): one MLflow run per
    trial with its parameters and objective, and none of MLflow's INFO lines (its database set-up, alembic's
    migrations) nor optuna-integration's deprecation FutureWarning on the terminal (evomerge.noise)."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("optuna_integration")
    (tmp_path / "tracking.py").write_text(readme_tracking_module())
    base, fts = tiny_family(tmp_path / "family", n=2)
    family = (str(base), [str(f) for f in fts])
    settings = search_settings(family, tmp_path / "run", name="tracked", n_trials=3, seed=1, baselines=False,
                               callbacks=["tracking:mlflow"])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    tests = str(Path(__file__).resolve().parent)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), tests, os.environ.get("PYTHONPATH")]))
    # the example's store, sqlite:///mlflow.db, and MLflow's artifacts land in the working dir
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", "run.yaml", "--no-export"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines()
             if re.search(r"\bINFO\b.*\b(mlflow|alembic)\b|FutureWarning|deprecated", line)]
    assert noise == [], done.stderr[-3000:]

    config = RunConfig.model_validate(settings)
    trials = optuna.load_study(study_name="tracked", storage=config.storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")  # named after the study
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["0", "1", "2"]  # one run per trial, named by its number
    names = {"lambda": "lambda", **{f"weight[{Path(f).name}]": f"weight/{Path(f).name}" for f in fts}}
    for trial in trials:
        run = runs[str(trial.number)].data
        assert set(trial.params) == set(names)
        # MLflow keeps a parameter as str(value): Python's repr, which reads back to the same float
        assert {key: float(value) for key, value in run.params.items()} == {
            names[key]: value for key, value in trial.params.items()}
        assert run.metrics == {"objective": trial.value}
        assert float(run.tags["val/norm_sum"]) == trial.user_attrs["val/norm_sum"] == trial.value
        assert run.tags["kind"] == "search" and run.tags["state"] == "COMPLETE"
