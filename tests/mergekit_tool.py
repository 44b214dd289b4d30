"""Where the tests find mergekit's command-line tools (its own venv) and the marks that skip without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

INSTALL = "bash scripts/mergekit.sh (mergekit 0.1.5 in /tmp/venv-bench)"


def mergekit_tool(name: str = "mergekit-yaml") -> Path:
    """mergekit's script ``name`` beside ``$EVOMERGE_MERGEKIT_BIN`` (default /tmp/venv-bench/bin/mergekit-yaml)."""
    return Path(os.environ.get("EVOMERGE_MERGEKIT_BIN", "/tmp/venv-bench/bin/mergekit-yaml")).parent / name


def mergekit_marks(tool: Path) -> list[pytest.MarkDecorator]:
    """The ``mergekit`` marker, plus a skip naming the fix when ``tool`` is missing."""
    marks = [pytest.mark.mergekit]
    if not tool.is_file():
        marks.append(pytest.mark.skip(reason=f"{tool.name} not found at {tool}: {INSTALL}, or set "
                                             "EVOMERGE_MERGEKIT_BIN"))
    return marks
