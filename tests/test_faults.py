"""Evaluator faults: each becomes a FAIL trial (or a test-score cell that says why), never a traceback, a hang, a
RUNNING trial or a lost report."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import optuna
import pytest
import search_fitness
import yaml
from optuna.trial import TrialState
from search_fitness import search_settings
from tiny_models import tiny_family

from evomerge.cli import main
from evomerge.evaluate import EvalResult
from evomerge.search.config import RunConfig
from evomerge.search.study import TrialFault, evaluate, run_search, run_soup
from evomerge.search.trials import StudyFailed


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("faults-family"), n=2)
    return str(base), [str(f) for f in fts]


class Scores:
    """An evaluator (the protocol's one method) whose results are given: what a broken metric might produce."""

    def __init__(self, objective: float) -> None:
        self.objective = objective

    def score(self, model, tokenizer, *, fidelity: float = 1.0) -> EvalResult:
        return EvalResult(metrics={"m": self.objective}, objective=self.objective, objectives=[self.objective],
                          items=None, n_items=1, seconds=0.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_objective_is_a_trial_fault(value):
    with pytest.raises(TrialFault, match=rf"non-finite objective \({value}\); metrics \{{'m': {value}\}}"):
        evaluate(Scores(value), None, None)
    assert evaluate(Scores(0.5), None, None).objective == 0.5


@pytest.fixture
def faults():
    """Plant faults by call number in search_fitness.faulty; cleared after the test."""
    search_fitness.CALLS["n"] = 0
    yield search_fitness.FAULTS
    search_fitness.FAULTS.clear()


def settings(family, tmp_path: Path, **kw) -> dict:
    return search_settings(family, tmp_path / "run", **{**dict(
        name="faults", evaluator={"type": "callable", "function": "search_fitness:faulty"}, sampler="random",
        n_trials=4, seed=1, baselines=False), **kw})


def trials_of(cfg: RunConfig) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()


def test_nan_exit_hang_and_a_failed_test_score_are_failures_with_reasons(family, tmp_path, faults, caplog):
    # calls 1-7 validate trials 0-6 (1 ok, 2 NaN, 3 sys.exit, 4 hangs past trial_timeout_s, 5-7 ok: four
    # finished trials); call 8 is the best trial's test scoring, and fails
    faults.update({2: "nan", 3: "exit", 4: "hang", 8: "raise"})
    cfg = RunConfig.model_validate(settings(family, tmp_path, trial_timeout_s=1.0))
    optuna.logging.enable_propagation()  # Optuna's log lines reach caplog
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            summary = run_search(cfg, progress=False, export=False)
    finally:
        optuna.logging.disable_propagation()
    assert time.monotonic() - started < 60  # the hanging evaluation was stopped after a second
    trials = trials_of(cfg)
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 3
    errors = [t.user_attrs.get("error") for t in trials[1:4]]
    assert errors[0].startswith("EvaluationError: callable evaluator search_fitness:faulty must return a finite")
    assert errors[1] == "TrialFault: the evaluator called sys.exit(3)"
    assert errors[2] == "TrialFault: the trial ran longer than trial_timeout_s"
    # one line per failed trial: no traceback, no parameter dump, no "failed with value None"
    failures = [r for r in caplog.records if r.name.startswith("optuna") and "failed" in r.getMessage()]
    assert {r.getMessage() for r in failures} == {f"Trial {t.number} failed: {t.user_attrs['error']}"
                                                  for t in trials[1:4]}
    assert not any(r.exc_info for r in caplog.records)

    best = summary["best_trial"]
    attrs = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).user_attrs
    assert attrs[f"test:{best}"] == {"error": "RuntimeError: planted failure at call 8"}
    assert summary["test"] == {f"{best}:search": None}
    report = Path(summary["report"]).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| best "))
    assert f"| #{best} | " in row and "| RuntimeError: planted failure at call 8 |" in row
    with open(Path(summary["report"]).parent / "trials.csv") as f:
        rows = {int(r["number"]): r for r in csv.DictReader(f)}
    assert rows[best]["test error"] == "RuntimeError: planted failure at call 8"
    assert rows[2]["state"] == "FAIL" and rows[2]["error"] == errors[1]


def test_ctrl_c_in_the_evaluator_fails_the_trial_and_stops_the_run(family, tmp_path, faults):
    faults.update({2: "interrupt"})
    cfg = RunConfig.model_validate(settings(family, tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, progress=False, export=False)
    trials = trials_of(cfg)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["error"] == "KeyboardInterrupt: "
    faults.clear()
    summary = run_search(cfg, progress=False, export=False)  # the lock was released: the re-run resumes
    trials = trials_of(cfg)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4 and len(trials) == 5
    assert summary["best_trial"] in {t.number for t in trials if t.state == TrialState.COMPLETE}


def test_ctrl_c_on_the_command_line_is_one_line_and_exit_130(family, tmp_path, faults, capsys):
    faults.update({1: "interrupt"})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(settings(family, tmp_path)))
    assert main(["search", str(config), "--no-export"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        "evomerge: interrupted; the study keeps every finished trial: re-run the same command to resume")
    (trial,) = trials_of(RunConfig.from_yaml(config))
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == "KeyboardInterrupt: "


def test_a_search_without_a_completed_trial_reports_and_exits_with_one_line(family, tmp_path, faults, capsys):
    faults.update({0: "always"})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(settings(family, tmp_path, n_trials=3)))
    assert main(["search", str(config), "--no-export"]) == 1
    err = capsys.readouterr().err  # the progress bar and one line per failed trial, then the error
    assert "Traceback" not in err
    report = tmp_path / "run" / "report" / "summary.md"
    assert err.splitlines()[-1] == ("evomerge: error: study faults has no completed trial (3 failed trial(s), e.g. "
                                    f"#2: RuntimeError: planted failure at call 3); the report lists every failure: "
                                    f"{report}")
    text = report.read_text()
    assert "- Best trial: none yet (no completed trial)" in text
    assert "- #0 (search): RuntimeError: planted failure at call 1" in text


def test_a_soup_whose_step_fails_reports_and_raises(family, tmp_path, faults):
    faults.update({2: "raise"})
    cfg = RunConfig.model_validate(settings(family, tmp_path, base=None, space=None))
    with pytest.raises(StudyFailed, match=r"a soup step failed \(RuntimeError: planted failure at call 2\)"):
        run_soup(cfg, progress=False, export=False)
    trials = trials_of(cfg)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert "planted failure at call 2" in (tmp_path / "run" / "report" / "summary.md").read_text()
