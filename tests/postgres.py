"""A throw-away PostgreSQL server for tests, through scripts/postgres.sh (initdb + pg_ctl in a temporary dir)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "postgres.sh"


def unavailable() -> str | None:
    """Why no server can be started here (a skip reason), or None when one can."""
    import sqlalchemy

    try:  # the driver SQLAlchemy uses for postgresql:// URLs: psycopg (3) from SQLAlchemy 2.1 on, psycopg2 before
        sqlalchemy.create_engine("postgresql://evomerge@127.0.0.1/evomerge")
    except ImportError as err:
        return f"no PostgreSQL driver for SQLAlchemy {sqlalchemy.__version__} ({err}): pip install -e '.[distributed]'"
    if shutil.which("bash") is None:
        return "no bash to run scripts/postgres.sh"
    found = subprocess.run(["bash", str(SCRIPT), "bindir"], capture_output=True, text=True)
    if found.returncode != 0:
        return ("no PostgreSQL server binaries (pg_ctl on PATH or under /usr/lib/postgresql/<version>/bin): "
                "apt-get install postgresql, or run `bash scripts/postgres.sh install` as root")
    return None


@contextmanager
def server() -> Iterator[str]:
    """Start a fresh cluster and yield its URL (postgresql://evomerge:PW@127.0.0.1:PORT/evomerge); stop and delete
    it afterwards. The dir is made directly under the system temp dir: as root the server runs as ``postgres``,
    which cannot enter pytest's private tmp dirs."""
    directory = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"scripts/postgres.sh start failed: {started.stderr.strip()}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, text=True)
        shutil.rmtree(directory, ignore_errors=True)
