"""benchmarks/lorahub.py --quick end to end (slow: it trains a small LoRA stage and runs CMA-ES searches)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_lorahub_benchmark_writes_every_row_per_seed(tmp_path):
    out = tmp_path / "lorahub"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lorahub.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, timeout=1200)
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    names = {r["row"] for r in rows}
    assert {"base (zero-shot)", "lorahub (cma-es)", "ties (cma-es)", "own adapter (reference)"} <= names
    assert {r["seed"] for r in rows} == {"0", "1"} and all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    # the held-out task's own adapter beats the base it was trained on
    own = [float(r["test_acc"]) for r in rows if r["row"] == "own adapter (reference)"]
    base = [float(r["test_acc"]) for r in rows if r["row"] == "base (zero-shot)"]
    assert min(own) > max(base)
    text = out.with_suffix(".md").read_text()
    assert "| lorahub (cma-es) |" in text and "factors MB" in text and "peft" in text
