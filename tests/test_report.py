"""evomerge.report: summary table values, layer heatmap values, plots, trials.csv, storage discovery.

Studies are synthetic: trials made with ``optuna.trial.create_trial`` and user_attrs per the search contract
(recipe, kind, metrics, timings, test results on the trial or in the study's ``test:<n>`` user_attr).
"""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from PIL import Image

from evomerge.recipe import parse_recipe
from evomerge.report import (
    RunStorage,
    format_seconds,
    kind_label,
    layer_table,
    load_study,
    task_metrics,
    write_report,
)

pytestmark = pytest.mark.usefixtures("quiet_optuna")


SOURCES = ["/zoo/expert_a", "/zoo/expert_b"]
DIST = {"w_a": FloatDistribution(-1.0, 1.0), "w_b": FloatDistribution(-1.0, 1.0), "lam": FloatDistribution(0.0, 2.0)}


def ta_recipe(weight_a: Any, weight_b: Any, lam: Any) -> dict[str, Any]:
    """A task-arithmetic recipe dict (as stored in user_attrs) with the given per-source weights and lambda."""
    return parse_recipe({
        "method": "task_arithmetic", "base": "/zoo/base",
        "sources": [{"model": SOURCES[0], "parameters": {"weight": weight_a}},
                    {"model": SOURCES[1], "parameters": {"weight": weight_b}}],
        "parameters": {"lambda": lam},
    }).model_dump(mode="json")


BEST_RECIPE = ta_recipe([0.0, 1.0], {"self_attn": 0.2, "mlp": [0.4, 0.8], "default": 0.5}, [1.0, 0.5])

# number -> (kind, value, val metrics, merge s, eval s, test results on the trial or None)
TRIALS: dict[int, tuple[str, float, dict[str, float], float, float, dict[str, Any] | None]] = {
    0: ("baseline:source:/zoo/expert_a", 0.5, {"acc": 0.5, "ppl": 12.5}, 0.0, 1.5,
        {"test_objective": 0.4375, "test_metrics": {"acc": 0.4375}}),
    1: ("baseline:source:/zoo/expert_b", 0.5625, {"acc": 0.5625, "ppl": 11.25}, 0.0, 1.25, None),
    2: ("baseline:uniform", 0.625, {"acc": 0.625, "ppl": 10.5}, 0.125, 1.75, None),
    3: ("search", 0.59375, {"acc": 0.59375, "ppl": 10.75}, 0.25, 1.5, None),
    4: ("search", 0.6875, {"acc": 0.6875, "ppl": 9.5}, 0.375, 2.25, None),
    5: ("search", 0.65625, {"acc": 0.65625, "ppl": 9.75}, 0.25, 2.0, None),
    6: ("search", 0.53125, {"acc": 0.53125, "ppl": 11.5}, 0.25, 1.5, None),
}
# Finished trials are read-only: the search stores test results of the best and baselines in the study.
STUDY_TEST = {"test:1": {"metrics": {"acc": 0.53125}, "objective": 0.53125},
              "test:4": {"metrics": {"acc": 0.65625}, "objective": 0.65625}}


def new_study(storage: str, name: str = "demo", directions: tuple[str, ...] = ("maximize",),
              objective: list[str] | None = None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, directions=list(directions))
    attrs = {"num_layers": 4, "sources": SOURCES, "base": "/zoo/base", "objective": objective or ["acc"],
             "space": "ta.yaml", "kind": "search"}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def add_trials(study: optuna.Study) -> None:
    rng = np.random.default_rng(0)
    for number, (kind, value, metrics, merge_s, eval_s, test) in TRIALS.items():
        search = kind == "search"
        w_a, w_b, lam = (float(x) for x in rng.uniform([-1, -1, 0], [1, 1, 2]))
        recipe = BEST_RECIPE if number == 4 else ta_recipe(w_a, w_b, lam)
        study.add_trial(create_trial(
            value=value, params={"w_a": w_a, "w_b": w_b, "lam": lam} if search else {},
            distributions=DIST if search else {},
            user_attrs={"kind": kind, "recipe": recipe, "metrics": metrics, "merge_seconds": merge_s,
                        "eval_seconds": eval_s, **(test or {})},
        ))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={
        "kind": "search", "recipe": ta_recipe(1.0, 1.0, 1.0),
        "error": "MergeError: merge of 'model.layers.0.mlp.up_proj.weight' produced NaN/Inf\nTraceback (most recent)"}))
    for key, value in STUDY_TEST.items():
        study.set_user_attr(key, value)


def markdown_rows(text: str, section: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (lists of cells) of the first Markdown table after heading ``section``."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return cells[0], cells[2:]


def assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        width, height = image.size
    assert 100 < width < 2000 and 100 < height < 2000, (path, image.size)  # small, dpi ~100
    return width, height


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, report dir) of the single-objective study, reported once for the tests below."""
    run = tmp_path_factory.mktemp("run")
    study = new_study(f"sqlite:///{run / 'study.db'}")
    add_trials(study)
    (run / "run.json").write_text(json.dumps({"study_name": "demo", "storage": f"sqlite:///{run / 'study.db'}"}))
    out = run / "report"
    summary = write_report(load_study(run), out, title="Demo run", run_dir=run)
    assert summary == out / "summary.md"
    return run, out


# ------------------------------------------------------------------------------------------------ summary
def test_summary_table_has_the_exact_values_of_best_and_baselines(report: tuple[Path, Path]) -> None:
    """The compact table: objective and one metric per task (acc is the objective: not repeated), 3 decimals, the
    difference to the best source alone (expert_b: 0.5625 on validation, 0.53125 on test)."""
    text = (report[1] / "summary.md").read_text()
    header, table = markdown_rows(text, "Best vs baselines")
    rows = {row[0]: row for row in table}
    assert len(rows) == len(table)
    assert header == ["row", "trial", "val objective", "val ppl", "test objective", "Δ val", "Δ test"]
    assert list(rows) == ["best (search)", "source: expert_a", "source: expert_b", "uniform"]
    tests = {0: 0.4375, 1: 0.53125, 4: 0.65625}  # trial attrs / study attrs
    for label, number in {"best (search)": 4, "source: expert_a": 0, "source: expert_b": 1, "uniform": 2}.items():
        _, value, metrics, _, _, _ = TRIALS[number]
        row = rows[label]
        assert row[1] == f"#{number}"
        assert row[2:4] == [f"{value:.3f}", f"{metrics['ppl']:.3f}"]
        assert row[5] == f"{value - 0.5625:+.3f}"
        if number in tests:
            assert row[4] == f"{tests[number]:.3f}" and row[6] == f"{tests[number] - 0.53125:+.3f}"
        else:
            assert row[4] == row[6] == "—"
    assert rows["best (search)"][2:] == ["0.688", "9.500", "0.656", "+0.125", "+0.125"]
    assert "objective minus that of the best source alone (source: expert_b)" in text


def test_summary_header_counts_recipe_failures_and_dashboard(report: tuple[Path, Path]) -> None:
    run, out = report
    text = (out / "summary.md").read_text()
    assert text.startswith("# Demo run\n")
    assert "- Trials: 8 (7 complete, 1 failed)" in text
    assert "- Best trial: #4 (search), objective 0.6875" in text
    assert "- #7 (search): MergeError: merge of 'model.layers.0.mlp.up_proj.weight' produced NaN/Inf" in text
    assert "Traceback" not in text  # first line of the error only
    recipe_yaml = text.split("## Best recipe (trial #4)\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert parse_recipe(yaml.safe_load(recipe_yaml)) == parse_recipe(BEST_RECIPE)
    assert f"pip install optuna-dashboard && optuna-dashboard sqlite:///{(run / 'study.db').resolve()}" in text
    for name in ("history.png", "importances.png", "layers.png"):
        assert f"![{name}]({name})" in text
    assert "pareto.png" not in text  # one objective


def test_plots_are_valid_pngs(report: tuple[Path, Path]) -> None:
    out = report[1]
    for name in ("history.png", "importances.png", "layers.png"):
        assert_png(out / name)
    assert not (out / "pareto.png").exists()


def test_trials_csv_has_every_trial(report: tuple[Path, Path]) -> None:
    with (report[1] / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == list(range(8))
    for number, (kind, value, metrics, merge_s, eval_s, _) in TRIALS.items():
        row = rows[number]
        assert (row["state"], row["kind"]) == ("COMPLETE", kind)
        assert float(row["objective"]) == value
        assert (float(row["val acc"]), float(row["val ppl"])) == (metrics["acc"], metrics["ppl"])
        assert (float(row["merge s"]), float(row["eval s"])) == (merge_s, eval_s)
    assert float(rows[4]["test acc"]) == 0.65625 and rows[2]["test acc"] == ""
    assert rows[7]["state"] == "FAIL" and rows[7]["objective"] == "" and rows[7]["error"].startswith("MergeError")


def optuna_importances(trials: list[optuna.trial.FrozenTrial]) -> dict[str, float]:
    """Optuna's own fANOVA importances (seed 0) of a study holding exactly ``trials``."""
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def test_importances_are_optunas_over_the_search_trials(report: tuple[Path, Path]) -> None:
    run, out = report
    text = (out / "summary.md").read_text()
    assert "over the 4 completed search trials, 3 parameters; baselines excluded" in text
    assert "Warning" not in text  # 4 trials for 3 parameters
    header, rows = markdown_rows(text, "Parameter importances")
    assert header == ["parameter", "importance"]
    search = [t for t in load_study(run).get_trials() if t.user_attrs["kind"] == "search" and t.params]
    expected = optuna_importances(search)
    assert [row[0] for row in rows] == sorted(expected, key=expected.__getitem__, reverse=True)
    assert {row[0]: row[1] for row in rows} == {p: f"{v:.3f}" for p, v in expected.items()}


def test_importances_warn_with_fewer_search_trials_than_parameters(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}")
    for value, (w_a, w_b, lam) in ((0.25, (0.5, -0.5, 1.0)), (0.75, (-0.25, 0.25, 0.5))):
        study.add_trial(create_trial(value=value, params={"w_a": w_a, "w_b": w_b, "lam": lam}, distributions=DIST,
                                     user_attrs={"kind": "search", "recipe": ta_recipe(w_a, w_b, lam)}))
    # a baseline enqueued with parameters, as a search enqueues them: Optuna's importances over every trial (what
    # optuna-dashboard shows) count it, the report's do not
    study.add_trial(create_trial(value=1.0, params={"w_a": 1.0, "w_b": 0.0, "lam": 1.0}, distributions=DIST,
                                 user_attrs={"kind": "baseline:uniform", "recipe": ta_recipe(1.0, 0.0, 1.0)}))
    text = write_report(study, tmp_path / "report").read_text()
    assert ("**Warning:** only 2 search trials for 3 parameters: too few to tell the parameters apart, read these "
            "importances as noise.") in text
    _, rows = markdown_rows(text, "Parameter importances")
    expected = optuna_importances(study.get_trials()[:2])
    assert {row[0]: row[1] for row in rows} == {p: f"{v:.3f}" for p, v in expected.items()}
    assert optuna_importances(study.get_trials()) != expected


# ----------------------------------------------------------------------------------------- layer table
def test_layer_table_interpolates_gradients_and_splits_filters() -> None:
    labels, matrix = layer_table(parse_recipe(BEST_RECIPE), 4)
    expected = {
        "expert_a: weight": [0, 1 / 3, 2 / 3, 1],  # [0, 1] at layer / (L - 1)
        "expert_b: weight [self_attn]": [0.2] * 4,
        "expert_b: weight [mlp]": [0.4, 0.4 + 0.4 / 3, 0.4 + 0.8 / 3, 0.8],
        "lambda": [1.0, 1 - 0.5 / 3, 1 - 1.0 / 3, 0.5],
    }
    assert labels == list(expected)
    np.testing.assert_allclose(matrix, np.array(list(expected.values())), rtol=0, atol=1e-12)


def test_layer_table_lookup_order_and_exact_per_layer_lists() -> None:
    """Source value, then the recipe's top-level default, then the method default; a per-filter mapping without a
    matching key falls through; a list of num_layers values is taken layer by layer; booleans get no row."""
    recipe = parse_recipe({
        "method": "ties", "base": "/zoo/base",
        "sources": [{"model": SOURCES[0], "parameters": {"density": 0.3, "weight": [0.1, 0.9, 0.3, 0.7]}},
                    {"model": SOURCES[1], "parameters": {"weight": {"self_attn": 0.25}}}],
        "parameters": {"density": 0.7, "normalize": True},
    })
    labels, matrix = layer_table(recipe, 4)
    expected = {
        "expert_a: weight": [0.1, 0.9, 0.3, 0.7],
        "expert_a: density": [0.3] * 4,
        "expert_b: weight [self_attn]": [0.25] * 4,
        "expert_b: weight [mlp]": [1.0] * 4,  # ties' default weight
        "expert_b: density": [0.7] * 4,  # top-level default
    }
    assert labels == list(expected)
    np.testing.assert_allclose(matrix, np.array(list(expected.values())), rtol=0, atol=1e-12)


def test_layer_table_names_sources_by_full_path_when_last_components_clash() -> None:
    recipe = parse_recipe({"method": "linear", "sources": [
        {"model": "/a/final", "parameters": {"weight": 1.0}}, {"model": "/b/final", "parameters": {"weight": 2.0}}]})
    labels, matrix = layer_table(recipe, 3)
    assert labels == ["/a/final: weight", "/b/final: weight"]
    np.testing.assert_array_equal(matrix, [[1.0] * 3, [2.0] * 3])


def test_layer_table_refuses_passthrough() -> None:
    recipe = parse_recipe({"method": "passthrough", "slices": [{"model": SOURCES[0], "layer_range": [0, 2]}]})
    with pytest.raises(ValueError, match="layer path"):
        layer_table(recipe, 4)


# ---------------------------------------------------------------------------------------- other studies
def test_multi_objective_pareto(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}", directions=("maximize", "maximize"),
                      objective=["acc", "speed"])
    points = {0: ("baseline:uniform", (0.5, 0.9)), 1: ("search", (0.7, 0.5)), 2: ("search", (0.6, 0.6)),
              3: ("search", (0.55, 0.55)), 4: ("search", (0.8, 0.3))}  # #3 is dominated by #2
    for kind, values in points.values():
        params = {"w_a": values[0] - 0.5, "w_b": values[1] - 0.5} if kind == "search" else {}
        study.add_trial(create_trial(
            values=list(values), params=params, distributions={k: DIST[k] for k in params},
            user_attrs={"kind": kind, "recipe": ta_recipe(0.5, 0.5, 1.0), "metrics": {"acc": values[0]}}))
    text = write_report(study, tmp_path / "report").read_text()
    listed = re.search(r"- Pareto-optimal trials: (.*)", text).group(1)  # type: ignore[union-attr]
    assert listed == "#4, #1, #2, #0"  # highest first objective first
    header, rows = markdown_rows(text, "Best vs baselines")
    assert header[2:4] == ["val objective: acc", "val objective: speed"]
    assert [(r[0], r[1]) for r in rows] == [("pareto (search)", "#4"), ("pareto (search)", "#1"),
                                            ("pareto (search)", "#2"), ("pareto (uniform)", "#0"), ("uniform", "#0")]
    for row in rows:
        assert tuple(float(c) for c in row[2:4]) == points[int(row[1][1:])][1]
    assert "- Best trial: #4" in text
    for name in ("pareto.png", "history.png", "importances.png"):  # importances: one bar per objective
        assert_png(tmp_path / "report" / name)


def test_skips_importances_with_one_search_trial_and_draws_a_layer_path(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}")
    recipe = parse_recipe({"method": "passthrough", "slices": [
        {"model": SOURCES[0], "layer_range": [0, 3]}, {"model": SOURCES[1], "layer_range": [1, 4], "scale": 0.5}]})
    study.add_trial(create_trial(value=0.5, params={"w_a": 0.1}, distributions={"w_a": DIST["w_a"]},
                                 user_attrs={"kind": "search", "recipe": recipe.model_dump(mode="json")}))
    out = tmp_path / "report"
    out.mkdir()
    (out / "importances.png").write_bytes(b"stale")
    text = write_report(study, out).read_text()
    assert "- `importances.png`: skipped: 1 completed search trial(s); importances need at least 2" in text
    assert not (out / "importances.png").exists()
    assert_png(out / "layers.png")
    assert "optuna-dashboard sqlite:///RUN_DIR/study.db" in text and "optuna-dashboard RUN_DIR/study.log" in text


def test_report_of_a_study_without_completed_trials(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}")
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"kind": "baseline:uniform", "error": "OOM"}))
    text = write_report(study, tmp_path / "report").read_text()
    assert "- Best trial: none yet (no completed trial)" in text and "- #0 (uniform): OOM" in text
    assert not any((tmp_path / "report").glob("*.png"))


def test_one_metric_per_task_and_number_formats() -> None:
    names = ["zoo_add/acc", "zoo_add/acc_norm", "zoo_sub/acc", "zoo_sub/acc_norm", "gsm8k/exact_match,strict-match",
             "gsm8k/exact_match,flexible-extract", "ppl"]
    assert task_metrics(names, ["zoo_sub/acc_norm"]) == ["zoo_add/acc", "zoo_sub/acc_norm",
                                                          "gsm8k/exact_match,strict-match", "ppl"]
    assert [format_seconds(s) for s in (4.25, 60.4, 723.0, 7530.0)] == ["4.2 s", "1 min 00 s", "12 min 03 s",
                                                                       "2 h 05 min"]


def test_wall_time_spans_first_start_to_last_end(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}")
    start = datetime(2026, 1, 1, 12, 0, 0)
    for i, (begin, end) in enumerate(((0, 30), (20, 95), (100, 763))):
        trial = create_trial(value=0.5, user_attrs={"kind": "search", "recipe": ta_recipe(0.5, 0.5, 1.0)})
        trial.datetime_start, trial.datetime_complete = (start + timedelta(seconds=begin),
                                                         start + timedelta(seconds=end))
        study.add_trial(trial)
    assert "- Wall time: 12 min 43 s (first trial start to last trial end" in write_report(
        study, tmp_path / "report").read_text()


def test_kind_labels() -> None:
    assert kind_label("baseline:source:/runs/zoo/expert_a") == "source: expert_a"
    assert kind_label("baseline:uniform") == "uniform"
    assert kind_label("soup:3") == "soup: 3"
    assert kind_label("search") == "search"


# ---------------------------------------------------------------------------------------------- storage
def test_load_study_from_sqlite_run_dir(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}", name="mine")
    new_study(f"sqlite:///{tmp_path / 'study.db'}", name="other")
    study.add_trial(create_trial(value=0.25))
    with pytest.raises(ValueError, match=r"a single study is expected .* holds \['mine', 'other'\]"):
        load_study(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"study_name": "mine", "storage": "sqlite:///elsewhere.db"}))
    loaded = load_study(tmp_path)
    assert loaded.study_name == "mine" and [t.value for t in loaded.trials] == [0.25]
    assert loaded.user_attrs["num_layers"] == 4


def test_load_study_from_journal_run_dir(tmp_path: Path) -> None:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    study = optuna.create_study(storage=storage, study_name="journal", direction="maximize")
    study.add_trial(create_trial(value=0.75, user_attrs={"kind": "search"}))
    loaded = load_study(tmp_path)  # no run.json: the journal's only study
    assert loaded.study_name == "journal" and [t.value for t in loaded.trials] == [0.75]
    (tmp_path / "run.json").write_text(json.dumps({"study_name": "missing"}))
    with pytest.raises(ValueError, match="study 'missing' is expected"):
        load_study(tmp_path)


def test_load_study_errors_clearly_without_a_study(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no study in .*study\.db \(SQLite\), study\.log"):
        load_study(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"study_name": "x", "storage": f"sqlite:///{tmp_path}/gone.db"}))
    with pytest.raises(FileNotFoundError, match="no study in"):
        load_study(tmp_path)
    assert not (tmp_path / "gone.db").exists()  # a missing SQLite file is not created
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_study(tmp_path / "nope")


def test_dashboard_command_masks_a_password() -> None:
    where = RunStorage("url", "postgresql://evo:s3cret@db.host:5432/optuna", "demo")
    assert where.dashboard_command() == "optuna-dashboard postgresql://evo:***@db.host:5432/optuna"


def test_test_stderr_gets_a_column_beside_its_metric(tmp_path: Path) -> None:
    """Standard errors stored with test results (the study's test:<n>, a reference's record) are shown as
    ``value ± stderr`` in the summary and in a ``test <metric> ±`` column of trials.csv; rows without one show the
    value alone."""
    from evomerge.search import trials as records

    study = new_study(f"sqlite:///{tmp_path / 'study.db'}")
    add_trials(study)
    records.set_test_result(study, 4, {"acc": 0.65625}, 0.65625, stderr={"acc": 0.03125})
    recipe = parse_recipe(ta_recipe(0.5, 0.5, 1.0))
    records.set_reference(study, "uniform", recipe=recipe, metrics={"acc": 0.5}, values=[0.5], merge_seconds=0.0,
                          eval_seconds=1.0)
    records.set_reference_test(study, "uniform", metrics={"acc": 0.46875}, objective=0.46875,
                               stderr={"acc": 0.0625})
    text = write_report(study, tmp_path / "report", title="stderr").read_text()
    header, table = markdown_rows(text, "Best vs baselines")
    column = header.index("test objective")  # the objective is acc: its stderr is the objective's
    rows = {row[0]: row for row in table}
    assert rows["best (search)"][column] == "0.656 ± 0.031"
    assert rows["uniform (linear, outside the space)"][column] == "0.469 ± 0.062"
    assert rows["source: expert_b"][column] == "0.531"
    with (tmp_path / "report" / "trials.csv").open() as f:  # the CSV keeps the full columns
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[4]["test acc ±"]) == 0.03125 and csv_rows[1]["test acc ±"] == ""
