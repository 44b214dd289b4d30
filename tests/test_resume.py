"""`evomerge search` / `soup` killed with SIGKILL mid-trial: completed trials survive, the orphaned RUNNING trial is
failed when the re-run starts (at once: the local study's lock proves its process is dead) and retried with the same
parameters, and the re-run finishes the study with exactly its budget of finished trials and no RUNNING trial."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from search_fitness import instrumented_env, logged_calls
from tiny_models import tiny_family

from evomerge.search.storage import INTERRUPTED, make_storage, recover

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
N_TRIALS = 6
GRACE_S = 60  # far longer than the tests: a re-run that waited for the grace period would fail them
HANG_AT = 3  # the third evaluation of the first run never returns: two trials complete, the third is RUNNING


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("resume-family"), n=2)
    return str(base), [str(f) for f in fts]


def snapshot(trial: FrozenTrial) -> tuple:
    return trial.number, trial.state, trial.values, trial.params, trial.user_attrs, trial.datetime_complete


def wait_for_hang(proc: subprocess.Popen, logs: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (logs / f"{proc.pid}.hang").exists():
        if proc.poll() is not None:
            raise AssertionError(f"the search exited ({proc.returncode}) before its hanging trial:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no trial reached the hanging evaluation within {timeout} s")
        time.sleep(0.1)


def hanging_run(command: list[str], tmp_path: Path, hang_at: int) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``command`` (an instrumented run) and wait until its evaluation ``hang_at`` hangs: the process, its log
    dir and the (empty) log dir of the re-run."""
    first_logs, second_logs = tmp_path / "calls-1", tmp_path / "calls-2"
    first_logs.mkdir()
    second_logs.mkdir()
    first = subprocess.Popen(command, env=instrumented_env(first_logs, hang_at=hang_at), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_hang(first, first_logs)
    return first, first_logs, second_logs


def kill_9_mid_trial(command: list[str], tmp_path: Path, hang_at: int) -> Path:
    """:func:`hanging_run`, then SIGKILL; returns the re-run's log dir."""
    first, _, second_logs = hanging_run(command, tmp_path, hang_at)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    return second_logs


def run_config(tmp_path: Path, family, **kw) -> Path:
    """A search config whose evaluator is the instrumented norm sum (the final test scoring is not instrumented)."""
    base, fts = family
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({**dict(
        name="resume", base=base, sources=fts, space=str(SPACES / "task_arithmetic.yaml"),
        evaluator={"type": "callable", "function": "search_fitness:instrumented_norm_sum", "metrics": ["norm_sum"]},
        test_evaluator={"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]},
        n_trials=N_TRIALS, out=str(tmp_path / "run"), device="cpu", seed=1, heartbeat_s=1, grace_s=GRACE_S), **kw}))
    return config


def test_kill_9_mid_trial_then_resume(family, tmp_path):
    """The killed trial (a baseline, RUNNING with a live heartbeat a moment ago) is failed and re-queued as soon as
    the re-run starts, with no grace period to wait: the lock proves no other process holds the local study. While
    the first process lives, a second one is refused with one line naming its PID."""
    config = run_config(tmp_path, family)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "evomerge.cli", "search", str(config), "--no-export"]
    storage = f"sqlite:///{run / 'study.db'}"
    first, first_logs, second_logs = hanging_run(command, tmp_path, HANG_AT)
    before = optuna.load_study(study_name="resume", storage=storage).get_trials()
    refused = subprocess.run(command, env=instrumented_env(second_logs), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr  # one line, no traceback
    assert f"in use by process {first.pid}" in refused.stderr and "PostgreSQL" in refused.stderr
    assert not logged_calls(second_logs)  # refused before any evaluation
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL

    complete = [t for t in before if t.state == TrialState.COMPLETE]
    running = [t for t in before if t.state == TrialState.RUNNING]
    assert [t.number for t in complete] == [0, 1] and [t.number for t in running] == [2]
    assert sorted(logged_calls(first_logs)[first.pid]) == sorted(t.value for t in complete)
    after_kill = optuna.load_study(study_name="resume", storage=storage).get_trials()
    assert [snapshot(t) for t in after_kill] == [snapshot(t) for t in before]  # nothing lost, nothing half-written
    killed = running[0]
    assert killed.user_attrs["kind"].startswith("baseline:")

    second = subprocess.run(command, env=instrumented_env(second_logs), cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
    by_number = {t.number: t for t in trials}
    assert [snapshot(by_number[t.number]) for t in complete] == [snapshot(t) for t in complete]
    assert by_number[killed.number].state == TrialState.FAIL
    assert by_number[killed.number].user_attrs["error"] == INTERRUPTED
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["recipe"] == killed.user_attrs["recipe"]
    assert retry.user_attrs["kind"] == killed.user_attrs["kind"]
    states = [t.state for t in trials]
    kinds = [t.user_attrs["kind"] for t in trials if t.state == TrialState.COMPLETE]
    # n_trials counts searched trials; the baselines (each source alone, uniform, defaults) run on top of them
    assert kinds.count("search") == N_TRIALS and len(kinds) == N_TRIALS + 4 and states.count(TrialState.FAIL) == 1
    assert len(trials) == N_TRIALS + 4 + 1
    # the re-run evaluated only what was missing: each new trial once, the two kept ones not again
    (rerun_calls,) = logged_calls(second_logs).values()
    assert sorted(rerun_calls) == sorted(t.value for t in trials
                                         if t.state == TrialState.COMPLETE and t.number not in (0, 1))


def test_kill_9_mid_soup_step_then_resume(family, tmp_path):
    """A soup step (asked outside Optuna's optimize: it never sends a heartbeat) killed mid-evaluation is failed
    when the soup re-runs, and the soup re-scores that recipe and finishes: no trial stays RUNNING."""
    config = run_config(tmp_path, family, base=None, space=None)
    command = [sys.executable, "-m", "evomerge.cli", "soup", str(config), "--no-export"]
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    second_logs = kill_9_mid_trial(command, tmp_path, hang_at=2)
    killed = optuna.load_study(study_name="resume", storage=storage).get_trials()
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]

    second = subprocess.run(command, env=instrumented_env(second_logs), cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
    assert trials[0].state == TrialState.COMPLETE and trials[0].datetime_complete == killed[0].datetime_complete
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["error"] == INTERRUPTED
    assert TrialState.RUNNING not in {t.state for t in trials}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # the killed step's recipe was scored again, and nothing else twice: two sources, one soup step, the uniform
    # soup (the same recipe as that step for two sources: scored once)
    assert trials[1].user_attrs["recipe"] in [t.user_attrs["recipe"] for t in complete]
    keys = [json.dumps(t.user_attrs["recipe"], sort_keys=True) for t in complete]
    assert len(keys) == len(set(keys)) == 3
    (rerun_calls,) = logged_calls(second_logs).values()
    assert sorted(rerun_calls) == sorted(t.value for t in complete[1:])


def test_grace_must_exceed_heartbeat(tmp_path):
    with pytest.raises(ValueError, match=r"grace_s \(5\) must exceed heartbeat_s \(5\)"):
        make_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=5, grace_s=5)
    assert not (tmp_path / "study.db").exists()


def test_interrupted_failures_are_retried_once_including_those_of_older_studies(tmp_path):
    """Holding the lock, recover() also queues interrupted failures a dead process left without a retry (e.g.
    killed between failing a trial and queueing it), but none that was retried already, by evomerge (retry_of) or,
    in a study from before, by Optuna's retry callback (system attr failed_trial); nor a trial that failed on its
    own (its error is stored)."""
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=1, grace_s=2)
    study = optuna.create_study(storage=storage, study_name="s")
    study.set_user_attr("kind", "search")
    x = FloatDistribution(0.0, 1.0)

    def add(value: float | None, **kw) -> None:
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(params={"x": kw.pop("x")}, distributions={"x": x}, value=value,
                                                  state=state, **kw))

    add(None, x=0.0)  # 0: interrupted, retried by Optuna's callback as #1
    add(1.0, x=0.0, system_attrs={"failed_trial": 0, "retry_history": [0]})
    add(None, x=0.25, user_attrs={"error": INTERRUPTED})  # 2: interrupted, retried as #3
    add(1.0, x=0.25, user_attrs={"retry_of": 2})
    add(None, x=0.5)  # 4: failed by a heartbeat, never retried
    add(None, x=0.75, user_attrs={"error": "RuntimeError: a real failure"})  # 5: its own fault
    assert recover(study, storage, exclusive=True, grace_s=2, retry=True) == []
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs) for t in waiting] == [
        ({"x": 0.5}, {"kind": "search", "retry_of": 4})]
    recover(study, storage, exclusive=True, grace_s=2, retry=True)  # again: #4 is queued already
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
