"""Experiment tracking through the run config's ``callbacks:``: the README's MLflow example, run as written against a
local store, records one MLflow run per trial with its parameters and objective, and its W&B example, offline, one
history row per trial (each skipped without its tracker, e.g. in CI, whose test command installs the dev and
distributed extras only; ``pip install -e '.[mlflow]'`` / ``'.[wandb]'`` runs them)."""

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


def tracked_search(tmp_path: Path, callback: str, **env: str) -> tuple[dict, subprocess.CompletedProcess]:
    """``evomerge search`` of 3 trials with the README's tracking factory ``callback`` (``tracking:mlflow``,
    ``tracking:wandb``), in a fresh process whose working dir is ``tmp_path`` (where the trackers write), as a user
    runs it; the run config (a dict) and the finished process. No tracker variable of this environment leaks in."""
    (tmp_path / "tracking.py").write_text(readme_tracking_module())
    base, fts = tiny_family(tmp_path / "family", n=2)
    settings = search_settings((str(base), [str(f) for f in fts]), tmp_path / "run", name="tracked", n_trials=3,
                               seed=1, baselines=False, callbacks=[callback])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    tests = str(Path(__file__).resolve().parent)
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "WANDB_"))}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), tests, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", "run.yaml", "--no-export"], cwd=tmp_path,
                          env={**clean, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return settings, done


def test_the_readmes_mlflow_callback_logs_one_run_per_trial_quietly(tmp_path):
    """The README's MLflow factory: one MLflow run per trial with its parameters and objective, and none of
    MLflow's INFO lines (its database set-up, alembic's migrations) nor optuna-integration's deprecation
    FutureWarning on the terminal (evomerge.noise)."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("optuna_integration")
    settings, done = tracked_search(tmp_path, "tracking:mlflow")  # the store: sqlite:///mlflow.db in tmp_path
    noise = [line for line in done.stderr.splitlines()
             if re.search(r"\bINFO\b.*\b(mlflow|alembic)\b|FutureWarning|deprecated", line)]
    assert noise == [], done.stderr[-3000:]
    fts = settings["sources"]

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


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows (``run.log`` calls) of an offline W&B run file, read from its log format (W&B's LevelDB-style
    records: a 7-byte header ``:W&B`` + magic + version, 32 KiB blocks, each record a 7-byte header of CRC, length and
    type (full, first, middle, last) and a ``wandb_internal_pb2.Record``)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(partial)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_the_readmes_wandb_callback_logs_every_trial_offline(tmp_path):
    """The README's W&B factory, offline (no account, no key: ``WANDB_MODE=offline``, its files under
    ``WANDB_DIR``): one run whose history holds one row per trial, at the trial's number, with the trial's parameters
    under evomerge's names (W&B takes brackets) and its objective."""
    pytest.importorskip("wandb")
    pytest.importorskip("optuna_integration")
    settings, _ = tracked_search(tmp_path, "tracking:wandb", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"),
                                 WANDB_SILENT="true")
    trials = optuna.load_study(study_name="tracked",
                               storage=RunConfig.model_validate(settings).storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [row["_step"] for row in rows] == [t.number for t in trials]
    for row, trial in zip(rows, trials):
        assert {key: value for key, value in row.items() if not key.startswith("_")} == {
            **trial.params, "objective": trial.value}
        assert any("[" in key for key in trial.params)  # weight[<source>]: kept as it is
