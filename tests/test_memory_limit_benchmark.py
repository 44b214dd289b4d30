"""benchmarks/memory_limit.py's documented small run, as its docstring writes it: it finds a cgroup limit that
cannot hold the sources (the script refuses one that would), the engine without a limit holds them resident and
under the limit keeps them memory-mapped, and ``evomerge merge`` runs under its own (needs root and a cgroup v1
memory hierarchy; ``slow``: it writes 9 checkpoints of ~110 MB and runs three child processes)."""

from __future__ import annotations

import ast
import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_limit.py"
CGROUP = Path("/sys/fs/cgroup/memory")


def documented_small_run() -> list[str]:
    """The arguments of the docstring's ``--quick`` example."""
    doc = ast.get_docstring(ast.parse(SCRIPT.read_text()))
    assert doc is not None
    line = next(line for line in doc.splitlines() if "--quick" in line and "python" in line)
    words = shlex.split(line.split("#")[0])
    assert words[:2] == ["python", "benchmarks/memory_limit.py"], words
    return words[2:]


@pytest.mark.slow
def test_the_documented_small_run_merges_sources_over_its_limit(tmp_path):
    if not (CGROUP / "memory.limit_in_bytes").exists() or not os.access(CGROUP, os.W_OK):
        pytest.skip(f"needs a writable cgroup v1 memory hierarchy at {CGROUP} (root)")
    done = subprocess.run([sys.executable, str(SCRIPT), *documented_small_run(), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=SCRIPT.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "memory_limit.csv")))
    assert [(row["run"], row["plan"], row["method"]) for row in rows] == [
        ("no limit", "resident", "linear"), ("cgroup limit", "mapped", "linear"),
        ("evomerge merge, cgroup limit", "streamed", "linear")], rows
