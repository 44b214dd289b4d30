"""The zoo benchmarks' ``--quick`` runs end to end on the mini zoo (benchmarks/method_sweep.py, then
benchmarks/search_vs_baselines.py reading its CSV), checked against the studies they wrote: every registered
method is swept or listed as left out, each method's pick is the argmax of its validation column, the mean/std over
seeds are the trials' own values aggregated independently, CSV and Markdown agree, every search ran its budget and
its reported pick is the best of its re-scored top trials, and the paired differences are recomputed from the CSV."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import method_sweep  # noqa: E402
import search_vs_baselines as svb  # noqa: E402
import zoo_bench  # noqa: E402

from evomerge.methods import METHODS, get_method  # noqa: E402
from evomerge.search import trials as records  # noqa: E402


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep_run(mini_zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("method-sweep")
    method_sweep.main(["--quick", "--zoo", str(mini_zoo.root), "--out", str(out), "--work", str(out / "work")])
    return out


def test_every_method_is_swept_or_named_as_left_out() -> None:
    swept = set(method_sweep.GRIDS) | {method_sweep.PAIRWISE}
    assert set(method_sweep.QUICK_GRIDS) == set(method_sweep.GRIDS)
    assert swept | set(method_sweep.NOT_SWEPT) == set(METHODS)
    assert not swept & set(method_sweep.NOT_SWEPT)


def test_method_sweep_quick(sweep_run: Path) -> None:
    rows = read_csv(sweep_run / "method_sweep_quick.csv")
    main = [r for r in rows if r["section"] == method_sweep.ALL]
    assert {r["method"] for r in main} == set(method_sweep.QUICK_GRIDS)
    assert {r["method"] for r in rows if r["section"] not in (method_sweep.ALL, method_sweep.SUMMED)} == {
        method_sweep.PAIRWISE}
    summed = [r for r in rows if r["section"] == method_sweep.SUMMED]
    assert {r["method"] for r in summed} == set(method_sweep.QUICK_SUM_GRID)
    assert all(json.loads(r["params"])["normalize"] is False for r in summed)
    # the pick of each method is the argmax of its validation means (the first point on a tie)
    by_method: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_method[r["section"], r["method"]].append(r)
    for group in by_method.values():
        picked = [r for r in group if r["picked"] == "1"]
        assert len(picked) == 1
        assert picked[0] is max(group, key=lambda r: float(r["val_mean"]))
    # mean/std over seeds from the study's own trials (validation values, test scores stored on the study)
    study = optuna.load_study(study_name="methods", storage=f"sqlite:///{sweep_run / 'work/methods/study.db'}")
    values: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        recipe = records.recipe_of(t)
        test = study.user_attrs[f"{records.TEST_PREFIX}{t.number}"][records.OBJECTIVE]
        values[recipe.method, json.dumps(recipe.parameters)].append((t.values[0], test))
    seeded = 0
    for r in main:
        pairs = values[r["method"], r["params"]]
        assert len(pairs) == int(r["n_seeds"]) == (2 if get_method(r["method"]).stochastic and
                                                    r["method"] != "della_linear" else 1)
        for k, column in enumerate(("val", "test")):
            scores = [p[k] for p in pairs]
            assert float(r[f"{column}_mean"]) == pytest.approx(sum(scores) / len(scores), abs=1e-12)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            assert float(r[f"{column}_std"]) == pytest.approx(std, abs=1e-12)
        seeded += len(pairs) > 1 and pairs[0] != pairs[1]
    assert seeded >= 1  # the seeds drew different masks: the spread is not trivially 0
    # the Markdown's side-by-side table shows the CSV's picks with their numbers
    md = (sweep_run / "method_sweep_quick.md").read_text()
    for r in rows:
        if r["picked"] == "1":
            val = float(r["val_mean"])
            cell = f"{val:.3f}" if r["n_seeds"] == "1" else f"{val:.3f} ± {float(r['val_std']):.3f}"
            assert f"| {r['method']} | {r['point']} | {r['n_seeds']} | {cell} |" in md
    assert "not swept: nuslerp" in md and "- command: `python " in md and "- versions: evomerge" in md
    assert (sweep_run / "method_sweep_quick.png").stat().st_size > 10_000


def test_paired_bootstrap_interval() -> None:
    assert zoo_bench.paired_bootstrap([0.25] * 5) == (0.25, 0.25)
    low, high = zoo_bench.paired_bootstrap([0.0, 0.1, 0.2, 0.3, 0.4])
    assert 0.0 <= low < 0.2 < high <= 0.4
    assert zoo_bench.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))


def test_search_vs_baselines_quick(mini_zoo, sweep_run: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    svb.main(["--quick", "--zoo", str(mini_zoo.root), "--out", str(tmp_path), "--work", str(work),
              "--sweep-csv", str(sweep_run / "method_sweep_quick.csv")])
    rows = read_csv(tmp_path / "search_vs_baselines_quick.csv")
    searches = [r for r in rows if r["kind"] == "search"]
    assert sorted((r["space"], r["sampler"], r["seed"]) for r in searches) == sorted(
        (space, sampler, str(seed)) for space in svb.SPACES for sampler in svb.SAMPLERS for seed in range(2))
    for r in searches:  # every search ran its 2 trials; the reported one is the best of both on the re-scoring
        db = work / svb.SPACES[r["space"]].removesuffix(".yaml") / "study.db"
        study = optuna.load_study(study_name=f"{r['sampler']}-s{r['seed']}", storage=f"sqlite:///{db}")
        complete = study.get_trials(states=(TrialState.COMPLETE,))
        assert len(complete) == 2
        rescored = records.confirmed(study.user_attrs)  # quick: confirm_top 2 on 10 validation docs per task
        assert set(rescored) == {t.number for t in complete}
        chosen = min(complete, key=lambda t: (-rescored[t.number], t.number))
        assert int(r["best_trial"]) == chosen.number and float(r["val"]) == chosen.values[0]
        assert float(r["confirmed"]) == rescored[chosen.number]
        assert float(r["test"]) == study.user_attrs[f"{records.TEST_PREFIX}{r['best_trial']}"][records.OBJECTIVE]
    base = defaultdict(list)
    for r in rows:
        if r["kind"] == "baseline":
            base[r["label"]].append((float(r["val"]), float(r["test"])))
    assert set(base) == {f"source:{t}" for t in mini_zoo.experts} | {
        "uniform", "task_arithmetic", "ties", "dare_ties", svb.HAND_TUNED}
    assert len(base["dare_ties"]) == 2 and len(base["uniform"]) == 1
    # the hand-tuned baseline is the sweep's overall validation pick, scored again here: same validation value
    sweep = [r for r in read_csv(sweep_run / "method_sweep_quick.csv") if r["section"] == method_sweep.ALL]
    pick = max(sweep, key=lambda r: float(r["val_mean"]))
    assert statistics.fmean(v for v, _ in base[svb.HAND_TUNED]) == pytest.approx(float(pick["val_mean"]))
    # the table's Δ: paired differences to the baseline with the best validation mean, recomputed from the CSV
    best = max(base, key=lambda k: statistics.fmean(v for v, _ in base[k]))
    md = (tmp_path / "search_vs_baselines_quick.md").read_text()
    assert f"Δ test vs {best} (95% CI)" in md
    for space in svb.SPACES:
        for sampler in svb.SAMPLERS:
            group = sorted((r for r in searches if r["space"] == space and r["sampler"] == sampler),
                           key=lambda r: int(r["seed"]))
            tests = [float(r["test"]) for r in group]
            ref = [t for _, t in base[best]]
            diffs = [t - ref[k if len(ref) > 1 else 0] for k, t in enumerate(tests)]
            mean, std = statistics.fmean(tests), statistics.stdev(tests)
            assert f"| {space} | {sampler} | 2 |" in md
            assert f"| {mean:.3f} ± {std:.3f} | {statistics.fmean(diffs):+.3f} [" in md
    assert (tmp_path / "search_vs_baselines_quick.png").stat().st_size > 10_000


def test_a_missing_zoo_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=f"{tmp_path}/zoo.json not found.*evomerge zoo build"):
        zoo_bench.find_zoo(str(tmp_path), quick=False)
