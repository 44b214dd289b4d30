"""`evomerge sweep`: the grid's points (hand-counted) and their recipes, seeds of stochastic methods, bad input
before any model loads, ranking on validation only, resume after kill -9, and the report's files and numbers.

The evaluator is the final norm's weight sum of the merged tiny model (``search_fitness:norm_sum``); validation
takes its ``norm_sum`` metric as the objective, the test split ``neg_square`` = −norm_sum², which ranks the points
the other way round (the norm sums are positive): a pick made on test would be the worst point on validation."""

from __future__ import annotations

import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import search_fitness
import yaml
from optuna.trial import TrialState
from search_fitness import instrumented_env, logged_calls
from test_resume import kill_9_mid_trial
from tiny_models import tiny_family

from evomerge.cli import main
from evomerge.methods import get_method
from evomerge.recipe import resolve_params
from evomerge.search import trials as records
from evomerge.search.storage import INTERRUPTED
from evomerge.search.sweep import POINT, SweepConfig, SweepError, expand, load_sweep_config, recipe_for, run_sweep

TENSOR = "model.layers.1.mlp.down_proj.weight"
GRID = {"task_arithmetic": {"lambda": [0.5, 1.0]},  # 2 points
        "ties": {"density": [0.3, 1.0], "lambda": [0.5, 1.0]},  # 2 x 2 = 4 points
        "dare_ties": {"density": 0.5, "seeds": 2}}  # 1 point x 2 seeds
N_TRIALS = 2 + 4 + 2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("sweep-family"), n=2)
    return str(base), [str(f) for f in fts]


def settings(family, tmp_path: Path, *, validation: str = "search_fitness:norm_sum", **kw) -> dict:
    base, fts = family
    return {**dict(name="sweep", base=base, sources=fts, sweep=GRID, out=str(tmp_path / "run"), device="cpu",
                   seed=7, heartbeat_s=1, grace_s=60,
                   evaluator={"type": "callable", "function": validation, "metrics": ["norm_sum"]},
                   test_evaluator={"type": "callable", "function": "search_fitness:norm_sum",
                                   "metrics": ["neg_square"]}), **kw}


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_expands_to_the_points_and_their_recipes(family, tmp_path):
    config = SweepConfig.model_validate(settings(family, tmp_path, sweep={
        **GRID, "della": {"density": [0.4], "epsilon": [0.1, 0.2]}, "model_stock": {}}))
    grid = expand(config)
    # hand count: 2 + 2*2 + 1*2 seeds + 1*2 points * 3 default seeds + 1 (model_stock's defaults)
    assert len(grid) == 2 + 4 + 2 + 6 + 1
    assert [(t.point.method, t.point.params, t.seed) for t in grid] == [
        ("task_arithmetic", {"lambda": 0.5}, 0), ("task_arithmetic", {"lambda": 1.0}, 0),
        ("ties", {"density": 0.3, "lambda": 0.5}, 0), ("ties", {"density": 0.3, "lambda": 1.0}, 0),
        ("ties", {"density": 1.0, "lambda": 0.5}, 0), ("ties", {"density": 1.0, "lambda": 1.0}, 0),
        ("dare_ties", {"density": 0.5}, 0), ("dare_ties", {"density": 0.5}, 1),
        *[("della", {"density": 0.4, "epsilon": e}, k) for e in (0.1, 0.2) for k in range(3)],
        ("model_stock", {}, 0)]
    # what each tensor gets: global parameters as given, per-source ones applied to every source, the rest default
    ties = recipe_for(config, grid[3])
    assert resolve_params(ties, get_method("ties"), TENSOR, 2) == {"density": [0.3, 0.3], "lambda": 1.0}
    assert ties.method == "ties" and ties.base == config.base and [s.model for s in ties.sources] == config.sources
    dare = [recipe_for(config, t) for t in grid[6:8]]
    assert [r.seed for r in dare] == [7, 8]  # the config's seed, then + 1
    assert resolve_params(dare[1], get_method("dare_ties"), TENSOR, 2) == {"density": [0.5, 0.5]}
    assert resolve_params(recipe_for(config, grid[-1]), get_method("model_stock"), TENSOR, 2) == {}
    assert recipe_for(config, grid[0]).seed == 7


@pytest.mark.parametrize(("grid", "message"), [
    ({"tie": {"density": [0.5]}}, "unknown merge method 'tie' (did you mean 'ties'?)"),
    ({"ties": {"densty": [0.5]}}, "sweep.ties: unknown parameter 'densty' (did you mean 'density'?)"),
    ({"ties": {"density": [0.5, 1.5]}}, "sweep.ties (density=1.5): ties: parameter 'density' = 1.5 is out of range"),
    ({"breadcrumbs": {"density": [0.95], "gamma": [0.1]}}, "gamma + density must be <= 1"),
    ({}, "sweep: an empty grid"),
    ({"ties": {"density": []}}, "sweep.ties.density: an empty list of values"),
    ({"dare_ties": {"density": [0.5], "seeds": 0}}, "sweep.dare_ties.seeds: must be a whole number >= 1, got 0"),
    ({"ties": {"density": [0.5], "seeds": 3}}, "sweep.ties.seeds: ties draws no random numbers"),
    ({"ties": {"density": [i / 1000 for i in range(26)], "lambda": [i / 10 for i in range(20)]}},
     "sweep: 520 trials (points x seeds) exceed max_points = 500"),
])
def test_bad_input_is_one_line_before_any_model_loads(family, tmp_path, capsys, grid, message):
    config = write_config(tmp_path, settings(family, tmp_path, sweep=grid))
    with pytest.raises(SweepError, match=None) as err:
        load_sweep_config(config)
    assert message in str(err.value)
    assert main(["sweep", str(config)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and message in err_text
    assert not (tmp_path / "run").exists()  # nothing created: refused before the runner started


def test_search_settings_are_refused(family, tmp_path):
    config = write_config(tmp_path, settings(family, tmp_path, n_trials=5, sampler="tpe"))
    with pytest.raises(SweepError, match="n_trials: not used by a sweep"):
        load_sweep_config(config)
    data = settings(family, tmp_path)
    data["sweeps"] = data.pop("sweep")
    with pytest.raises(SweepError, match=r"sweep: Field required; sweeps: unknown key \(did you mean 'sweep'\?\)$"):
        load_sweep_config(write_config(tmp_path, data))
    SweepConfig.model_validate(settings(family, tmp_path, max_points=8))  # exactly the grid's size fits
    with pytest.raises(SweepError, match="8 trials .* exceed max_points = 7"):
        expand(SweepConfig.model_validate(settings(family, tmp_path, max_points=7)))


def test_sweep_ranks_on_validation_and_reports_every_point(family, tmp_path, quiet_optuna):
    config = SweepConfig.model_validate(settings(family, tmp_path))
    summary = run_sweep(config, progress=False)
    study = optuna.load_study(study_name="sweep", storage=config.storage_url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert sorted(t.params[POINT] for t in trials) == list(range(N_TRIALS))  # every point once
    grid = expand(config)
    by_point = {t.params[POINT]: t for t in trials}
    for index, sweep_trial in enumerate(grid):  # each trial scored the recipe of its point
        assert records.recipe_of(by_point[index]) == recipe_for(config, sweep_trial)
    val = {i: t.values[0] for i, t in by_point.items()}
    test = {i: study.user_attrs[f"test:{t.number}"]["objective"] for i, t in by_point.items()}
    for i in range(6):  # deterministic methods: test = −val² of the same model
        assert test[i] == pytest.approx(-val[i] ** 2)
    dare = [val[6], val[7]]
    assert dare[0] != dare[1]  # two seeds, two random drops
    # the picks: best mean validation per method, whatever test says
    expected = {"task_arithmetic": max(range(2), key=val.get), "ties": max(range(2, 6), key=val.get)}
    assert max(range(2, 6), key=test.get) != expected["ties"]  # test would have picked another point
    for method, index in expected.items():
        assert summary["picks"][method]["point"] == grid[index].point.label
        assert summary["picks"][method]["val"] == val[index]
        assert summary["picks"][method]["test"] == pytest.approx(test[index])
    assert summary["picks"]["dare_ties"]["val"] == pytest.approx(statistics.fmean(dare))
    overall = max([*expected.values(), 6], key=lambda i: statistics.fmean([val[6], val[7]]) if i == 6 else val[i])
    assert summary["best_point"] == f"{grid[overall].point.method}: {grid[overall].point.label}"

    report = Path(summary["report"]).parent
    rows = list(csv.DictReader(open(report / "sweep.csv")))
    assert len(rows) == 7  # points (the two dare seeds are one point)
    for row, indices in zip(rows, [[0], [1], [2], [3], [4], [5], [6, 7]]):
        assert row["method"] == grid[indices[0]].point.method
        assert int(row["n"]) == len(indices)
        assert float(row["val_mean"]) == pytest.approx(statistics.fmean(val[i] for i in indices))
        assert float(row["test_mean"]) == pytest.approx(statistics.fmean(test[i] for i in indices))
        assert float(row["val:norm_sum_mean"]) == pytest.approx(float(row["val_mean"]))
    assert float(rows[-1]["val_std"]) == pytest.approx(statistics.stdev(dare))
    assert rows[2]["param:density"] == "0.3" and rows[2]["param:lambda"] == "0.5"
    picks = list(csv.DictReader(open(report / "picks.csv")))
    assert [p["method"] for p in picks] == ["task_arithmetic", "ties", "dare_ties"]
    markdown = (report / "summary.md").read_text()
    best = grid[expected["ties"]].point
    assert f"| ties | {best.label} | 1 | {val[expected['ties']]:.4g} | {test[expected['ties']]:.4g} |" in markdown
    dare_cell = f"{statistics.fmean(dare):.4g} ± {statistics.stdev(dare):.2g}"
    assert f"| 0.5 | 2 | {dare_cell} |" in markdown
    for name in ["sweep_picks.png", "sweep_task_arithmetic_lambda.png", "sweep_ties_density.png",
                 "sweep_ties_lambda.png", "sweep_ties_heatmap.png"]:
        assert (report / name).stat().st_size > 1000, name
    assert not (report / "sweep_dare_ties_density.png").exists()  # one value: nothing to plot against
    # the CLI's report of the same run writes the same numbers
    assert main(["report", str(config.run_dir), "--out", str(tmp_path / "again")]) == 0
    assert list(csv.DictReader(open(tmp_path / "again" / "sweep.csv"))) == rows


def test_kill_9_mid_point_then_resume_finishes_exactly_the_rest(family, tmp_path):
    config = write_config(tmp_path, settings(family, tmp_path, validation="search_fitness:instrumented_norm_sum"))
    command = [sys.executable, "-m", "evomerge.cli", "sweep", str(config)]
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    second_logs = kill_9_mid_trial(command, tmp_path, hang_at=3)
    before = optuna.load_study(study_name="sweep", storage=storage).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]

    second = subprocess.run(command, env=instrumented_env(second_logs), cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="sweep", storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params[POINT] for t in complete) == list(range(N_TRIALS))  # each point exactly once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [(t.number, t.user_attrs["error"]) for t in failed] == [(2, INTERRUPTED)]
    assert len(trials) == N_TRIALS + 1
    # the re-run evaluated exactly the points the first run had not finished
    (rerun,) = logged_calls(second_logs).values()
    assert sorted(rerun) == sorted(t.values[0] for t in complete if t.number not in (0, 1))
    assert all(math.isfinite(v) for v in rerun) and len(rerun) == N_TRIALS - 2


def test_a_worker_joins_a_sweep_and_finishes_its_points(family, tmp_path, quiet_optuna):
    """`evomerge worker` reads the sweep's config from the study and runs the points not yet done (the GridSampler
    walk and the sweep's count of done points, not the search's n_trials)."""
    from evomerge.search.study import run_worker
    from evomerge.search.sweep import SweepRunner

    config = SweepConfig.model_validate(settings(family, tmp_path))
    with SweepRunner(config) as runner:
        study = runner.open_study()
        runner.optimize(study, n_trials=3, progress=False)
    assert len(study.get_trials()) == 3
    run_worker(config.storage_url, "sweep", progress=False)
    trials = optuna.load_study(study_name="sweep", storage=config.storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert sorted(t.params[POINT] for t in trials) == list(range(N_TRIALS))


def test_a_point_that_fails_is_done_reported_and_not_run_again(family, tmp_path, quiet_optuna):
    """A failure of the point itself (its evaluator raised) ends that point: the sweep goes on, runs no point twice,
    and the report's row says why it has no score; a re-run evaluates nothing."""
    search_fitness.CALLS["n"] = 0
    search_fitness.FAULTS.clear()
    search_fitness.FAULTS[2] = "raise"
    try:
        config = SweepConfig.model_validate(settings(family, tmp_path, test_evaluator=None, evaluator={
            "type": "callable", "function": "search_fitness:faulty"}))
        summary = run_sweep(config, progress=False)
        calls = search_fitness.CALLS["n"]
        run_sweep(config, progress=False)  # the re-run: every point done, the test scores kept
    finally:
        search_fitness.FAULTS.clear()
    trials = optuna.load_study(study_name="sweep", storage=config.storage_url).get_trials()
    assert len(trials) == N_TRIALS and sorted(t.params[POINT] for t in trials) == list(range(N_TRIALS))
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.user_attrs["error"].startswith("RuntimeError: planted failure at call 2")
    assert calls == N_TRIALS + (N_TRIALS - 1)  # every point once, then the test split of the completed ones
    assert search_fitness.CALLS["n"] == calls
    point = expand(config)[failed.params[POINT]].point
    rows = {(r["method"], r.get("param:lambda"), r.get("param:density")): r
            for r in csv.DictReader(open(Path(summary["report"]).parent / "sweep.csv"))}
    row = rows[(point.method, str(point.params.get("lambda", "")), str(point.params.get("density", "")))]
    assert "planted failure at call 2" in row["errors"]


def test_two_workers_share_a_sweep_on_postgresql(postgres_url, family, tmp_path, quiet_optuna):
    """Two `evomerge worker` processes on one sweep in PostgreSQL: both take part, every point is done, and a point
    scored twice (GridSampler's end-of-grid race) counts once in the summary."""
    from evomerge.search.sweep import SweepRunner, first_completed, summarize

    config = SweepConfig.model_validate(settings(family, tmp_path, storage=postgres_url, name=tmp_path.name,
                                                 validation="search_fitness:instrumented_norm_sum"))
    with SweepRunner(config) as runner:
        study = runner.open_study()
    logs = tmp_path / "calls"
    logs.mkdir()
    command = [sys.executable, "-m", "evomerge.cli", "worker", "--storage", postgres_url, "--study", tmp_path.name,
               "--device", "cpu"]
    workers = [subprocess.Popen(command, env=instrumented_env(logs, peers=2), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    trials = study.get_trials()
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert sorted(first_completed(trials)) == list(range(N_TRIALS))
    assert N_TRIALS <= len(trials) <= N_TRIALS + 1
    assert set(logged_calls(logs)) == {w.pid for w in workers}
    assert sum(r.val.n for r in summarize(study).points) == N_TRIALS


def test_resuming_with_another_grid_is_refused(family, tmp_path, quiet_optuna, capsys):
    """The points' numbers are the study's trials: a study made by one grid is not resumed with another."""
    config = write_config(tmp_path, settings(family, tmp_path, sweep={"task_arithmetic": {"lambda": [0.5]}}))
    assert main(["sweep", str(config)]) == 0
    capsys.readouterr()
    assert main(["sweep", str(config), "--seed", "8"]) == 2  # other recipe seeds: other points
    write_config(tmp_path, settings(family, tmp_path, sweep={"task_arithmetic": {"lambda": [0.5, 1.0]}}))
    assert main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("evomerge: error:")]
    assert len(errors) == 2 and all("holds a sweep of other points" in line for line in errors)
    assert "Traceback" not in err
    trials = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").get_trials()
    assert len(trials) == 1  # nothing ran


def test_a_sweep_whose_every_point_fails_says_so_in_one_line(family, tmp_path, capsys):
    data = settings(family, tmp_path, evaluator={"type": "callable", "function": "search_fitness:faulty"},
                    test_evaluator=None)
    config = write_config(tmp_path, data)
    search_fitness.FAULTS.clear()
    search_fitness.FAULTS[0] = "always"
    try:
        assert main(["sweep", str(config)]) == 1
    finally:
        search_fitness.FAULTS.clear()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge: error:")]
    assert len(errors) == 1 and f"({N_TRIALS} failed trial(s), e.g. #" in errors[0]
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "No completed point yet." in summary and summary.count("planted failure") == N_TRIALS


def test_the_engine_plans_memory_for_the_grids_methods_and_a_soup_for_linear(family, tmp_path):
    """A sweep's engine plans the working set of its grid's methods only (DELLA's magnitude ranks only when the grid
    has DELLA), a soup's for linear merges (planned for any method before)."""
    from search_fitness import search_settings

    from evomerge.engine import MergeEngine
    from evomerge.search.config import RunConfig
    from evomerge.search.study import Runner
    from evomerge.search.sweep import SweepRunner

    planned = {}
    for method in ("ties", "della"):
        config = SweepConfig.model_validate(settings(family, tmp_path / method, sweep={method: {"density": 0.5}}))
        with SweepRunner(config, progress=False) as runner:
            planned[method] = runner.engine.memory.working_set
    paths = [family[0], *family[1]]
    assert planned["ties"] == MergeEngine(paths, device="cpu", methods=["ties"]).memory.working_set
    assert planned["della"] == MergeEngine(paths, device="cpu").memory.working_set > planned["ties"]
    soup = RunConfig.model_validate({k: v for k, v in search_settings(family, tmp_path / "soup").items()
                                     if k not in ("space", "base")})
    with Runner(soup, study_kind=records.SOUP_KIND, progress=False) as runner:
        linear = MergeEngine(family[1], device="cpu", methods=["linear"]).memory.working_set
        assert runner.engine.memory.working_set == linear < MergeEngine(family[1], device="cpu").memory.working_set
