"""``benchmarks/search_throughput.py --quick`` end to end (marker ``mergekit``: it runs mergekit-yaml and lm-eval's CLI
per trial, minutes on 2 cores, so it stays out of the default run). It checks correctness, never a speed: the
mergekit + lm-eval loop scores every recipe of the evomerge search exactly as the search recorded it, and the
table's columns add up."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from mergekit_tool import mergekit_marks, mergekit_tool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import search_throughput as bench  # noqa: E402

from evomerge.zoo import Zoo  # noqa: E402

BINARY = mergekit_tool()
pytestmark = mergekit_marks(BINARY)


def test_quick_run_scores_agree_and_columns_add_up(mini_zoo: Zoo, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = bench.main(["--quick", "--n-trials", "2", "--zoo", str(mini_zoo.root), "--mergekit-bin", str(BINARY),
                         "--out", str(out)])
    rows, summary = result["rows"], result["summary"]
    assert [r.number for r in rows] == [0, 1]
    for r in rows:
        # lm-eval's CLI on mergekit's model on disk gives the score the search recorded for its live model
        assert r.max_abs_score_diff == 0 and r.loop_objective == r.evo_objective
        assert 0 < r.evo_objective < 1  # a score that can tell a wrong model from a right one
        assert r.loop_merge_s + r.loop_load_s + r.loop_evaluate_s + r.loop_other_s == pytest.approx(r.loop_total_s)
        assert r.evo_merge_s + r.evo_evaluate_s + r.evo_other_s == pytest.approx(r.evo_total_s)
        assert 0 < r.loop_startup_s < r.loop_merge_s + r.loop_other_s  # the start-ups are parts of these two
    # the ratios, recomputed from the per-trial CSV
    with open(out / "search_throughput.csv") as f:
        table = list(csv.DictReader(f))
    loop = sum(float(t["loop_total_s"]) for t in table)
    evo = sum(float(t["evo_total_s"]) for t in table)
    without = loop - sum(float(t["loop_startup_s"]) for t in table)
    assert summary["loop_trials_per_hour"] == pytest.approx(3600 * 2 / loop)
    assert summary["ratio"] == pytest.approx(loop / evo)
    assert summary["ratio_without_startup"] == pytest.approx(without / evo)
    assert summary["ratio_command"] == pytest.approx(loop / summary["evo_wall_s"])
    md = (out / "search_throughput.md").read_text()
    assert f"| {summary['ratio']:.1f}x |" in md and "(the same scores)" in md
