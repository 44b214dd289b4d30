"""Several `evomerge worker` processes sharing one study in PostgreSQL (a throw-away server, scripts/postgres.sh)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from search_fitness import instrumented_env, logged_calls
from tiny_models import tiny_family

from evomerge.report import write_report
from evomerge.search.config import RunConfig
from evomerge.search.storage import make_storage, mask_url
from evomerge.search.study import Runner, run_search, run_worker

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
WORKERS = 2
GRACE_S = 2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("dist-family"), n=2)
    return str(base), [str(f) for f in fts]


def config(family, url: str, tmp_path: Path, **kw) -> RunConfig:
    base, fts = family
    data = dict(name=tmp_path.name, base=base, sources=fts, space=str(SPACES / "task_arithmetic.yaml"),
                evaluator={"type": "callable", "function": "search_fitness:instrumented_norm_sum",
                           "metrics": ["norm_sum"]},
                sampler="random", n_trials=6, out=str(tmp_path / "run"), device="cpu", seed=1, storage=url)
    return RunConfig.model_validate({**data, **kw})


def test_two_workers_share_a_study(postgres_url, family, tmp_path):
    runner = Runner(config(family, postgres_url, tmp_path))
    study = runner.open_study()
    runner.enqueue_baselines(study)
    baselines = dict(runner.space.baseline_params(runner.models))
    n_trials = 4  # sampled trials; every baseline runs on top of them
    logs = tmp_path / "calls"
    logs.mkdir()
    command = [sys.executable, "-m", "evomerge.cli", "worker", "--storage", postgres_url, "--study", study.study_name,
               "--n-trials", str(n_trials), "--device", "cpu"]
    # the evaluator holds each worker's first trial until both workers are inside one: both take part
    workers = [subprocess.Popen(command, env=instrumented_env(logs, peers=WORKERS), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(WORKERS)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]

    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    # each worker stops once the study holds n_trials searched trials; the other may be finishing one more
    assert n_trials + len(baselines) <= len(trials) <= n_trials + len(baselines) + WORKERS - 1
    calls = logged_calls(logs)
    assert set(calls) == {w.pid for w in workers} and all(calls.values())
    # every trial was evaluated exactly once, by one worker
    assert sorted(v for values in calls.values() for v in values) == sorted(t.value for t in trials)

    kinds = Counter(t.user_attrs["kind"] for t in trials)
    assert {k: n for k, n in kinds.items() if k.startswith("baseline")} == {f"baseline:{b}": 1 for b in baselines}
    for t in trials:
        if t.user_attrs["kind"].startswith("baseline"):
            assert t.params == pytest.approx(baselines[t.user_attrs["kind"].removeprefix("baseline:")])
    # workers reseed their samplers: with the config's seed in both, the random sampler would repeat itself
    sampled = [tuple(sorted(t.params.items())) for t in trials if t.user_attrs["kind"] == "search"]
    assert len(sampled) == len(trials) - len(baselines) and len(set(sampled)) == len(sampled)

    summary = runner.finalize(study, export=False)
    best = max(trials, key=lambda t: t.value)
    assert summary["best_trial"] == best.number
    # the main process re-merges the workers' recipes: the same fitness (test evaluator = validation evaluator)
    for t in trials:
        if t.number == best.number or t.user_attrs["kind"].startswith("baseline"):
            assert study.user_attrs[f"test:{t.number}"]["objective"] == pytest.approx(t.value, rel=1e-6)
    report = write_report(study, tmp_path / "report", run_dir=runner.run_dir)
    with open(report.parent / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == len(trials)


def test_worker_needs_an_existing_search_study(postgres_url, family, tmp_path):
    with pytest.raises(ValueError, match="no study named 'absent'"):
        run_worker(postgres_url, "absent", progress=False)
    soup = Runner(config(family, postgres_url, tmp_path, space=None, name="a-soup"), study_kind="soup")
    soup.open_study()
    with pytest.raises(ValueError, match="holds no `evomerge search` run config .kind: soup"):
        run_worker(postgres_url, "a-soup", progress=False)


def test_worker_retries_trials_of_dead_processes_after_the_grace_period(postgres_url, family, tmp_path):
    """On a shared storage a RUNNING trial is an orphan once its heartbeat is older than grace_s, or, if it never
    sent one (its process died between Optuna's ask and the first heartbeat), once it started grace_s ago. Both
    are failed and re-queued with their parameters; the run ends with no RUNNING trial and its budget met."""
    cfg = config(family, postgres_url, tmp_path, heartbeat_s=1, grace_s=GRACE_S, baselines=False, n_trials=3)
    with Runner(cfg) as runner:
        study = runner.open_study()
    storage = make_storage(postgres_url, heartbeat_s=1, grace_s=GRACE_S)
    study_id = storage.get_study_id_from_name(study.study_name)
    space = {"lambda": FloatDistribution(0.5, 1.5), **{f"weight[ft{i}]": FloatDistribution(0.0, 1.0) for i in (0, 1)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna: heartbeats are meant for optimize
        silent = study.ask(space)  # died before its first heartbeat
        stale = study.ask(space)  # died after one heartbeat
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, stale.number))
    time.sleep(GRACE_S + 1)

    run_worker(postgres_url, study.study_name, progress=False)

    trials = study.get_trials()
    assert TrialState.RUNNING not in {t.state for t in trials}
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    for dead in (silent, stale):
        assert trials[dead.number].state == TrialState.FAIL
        (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
        assert retry.state == TrialState.COMPLETE and retry.params == dead.params


def test_refused_login_is_one_masked_line_before_any_run_dir(postgres_url, family, tmp_path):
    password = re.match(r"postgresql://[^:]+:([^@]+)@", postgres_url).group(1)
    wrong = postgres_url.replace(f":{password}@", ":not-the-password@")
    with pytest.raises(ValueError, match=r"^the storage server refused the login of postgresql://evomerge:\*\*\*@"
                                         r".*password authentication failed.*check the user and password") as error:
        run_search(config(family, wrong, tmp_path), progress=False)
    assert "not-the-password" not in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="refused the login"):
        run_worker(wrong, "any", progress=False)
    # the run.json of a PostgreSQL run holds the URL without its password
    with Runner(config(family, postgres_url, tmp_path)) as runner:
        runner.open_study()
    stored = json.loads((tmp_path / "run" / "run.json").read_text())["storage"]
    assert stored == mask_url(postgres_url) and password not in stored
