"""Shared pytest fixtures: the mini zoo (built once into the zoo cache, then reused)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from faults import tmpfs  # noqa: E402

from evomerge.zoo import Zoo, ZooConfig, cached_zoo  # noqa: E402


@pytest.fixture
def quiet_optuna():
    """Optuna's INFO lines (a line per study and trial) off during a test, its verbosity restored after."""
    from evomerge.report import quiet_optuna

    with quiet_optuna():
        yield


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory) -> list[str]:
    """Paths of a tiny random Llama base and three fine-tunes of it (tests/tiny_models.py), fp32, built once."""
    from tiny_models import tiny_family

    base, fts = tiny_family(tmp_path_factory.mktemp("tiny-llamas"), n=3)
    return [str(base), *(str(f) for f in fts)]


@pytest.fixture(scope="session")
def mini_zoo() -> Zoo:
    """The mini zoo (``ZooConfig.mini()``), from ``$EVOMERGE_ZOO_CACHE`` or ``<repo>/.zoo``; the
    first use on a machine builds it (about a minute on 2 CPU cores), later uses just load it."""
    return cached_zoo(ZooConfig.mini())


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs to fill (skipped where it cannot be mounted)."""
    with tmpfs(tmp_path / "disk") as mount:
        yield mount


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a throw-away PostgreSQL server (tests/postgres.py), shared by the session; skipped where none can
    be started."""
    import postgres

    reason = postgres.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with postgres.server() as url:
        yield url
