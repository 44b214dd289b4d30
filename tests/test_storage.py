"""Storage faults: one clear line each, no traceback, nothing created, no password printed; run.json is private."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from search_fitness import search_settings
from tiny_models import tiny_family

from evomerge.cli import main
from evomerge.report import RunStorage
from evomerge.search.config import RunConfig
from evomerge.search.storage import check_storage, mask_url, unmasked_for_libpq
from evomerge.search.study import Runner, run_search

SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("storage-family"), n=2)
    return str(base), [str(f) for f in fts]


def config(family, tmp_path: Path, **kw) -> RunConfig:
    return RunConfig.model_validate(search_settings(family, tmp_path / "run", name="st", **kw))


@pytest.mark.parametrize(("url", "masked"), [
    (f"postgresql://user:{SECRET}@db-host:5432/evomerge", "postgresql://user:***@db-host:5432/evomerge"),
    (f"postgresql+psycopg://user:{SECRET}@db-host/evomerge", "postgresql+psycopg://user:***@db-host/evomerge"),
    ("postgresql://user:p@ss@db-host/evomerge", "postgresql://user:***@db-host/evomerge"),  # an unescaped @
    ("postgresql://user@db-host/evomerge", "postgresql://user@db-host/evomerge"),
    ("sqlite:////runs/a/study.db", "sqlite:////runs/a/study.db"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked
    # read back from run.json, the URL leaves the password to PGPASSWORD / ~/.pgpass
    assert unmasked_for_libpq(mask_url(url)) == masked.replace(":***@", "@")


@pytest.mark.parametrize(("url", "message"), [
    (f"foo://user:{SECRET}@host/db", r"^unknown storage scheme 'foo' in foo://user:\*\*\*@host/db; use sqlite:///"),
    ("not a url", r"^unknown storage scheme 'not a url' in not a url; use sqlite:///PATH"),
    (f"postgresql://user:{SECRET}@127.0.0.1:1/db",  # nothing listens on port 1: refused at once
     r"^cannot reach the storage server of postgresql://user:\*\*\*@127.0.0.1:1/db \(.*Connection refused\); "
     r"check the host, the port and that the server runs$"),
])
def test_bad_storage_fails_before_any_run_dir(family, tmp_path, url, message):
    with pytest.raises(ValueError, match=message) as error:
        run_search(config(family, tmp_path, storage=url), progress=False)
    assert SECRET not in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_worker_on_a_missing_sqlite_file_creates_nothing(tmp_path, capsys):
    db = tmp_path / "typo" / "study.db"
    assert main(["worker", "--storage", f"sqlite:///{db}", "--study", "s"]) == 2
    err = capsys.readouterr().err
    assert err == (f"evomerge: error: no SQLite study at {db}; start it with `evomerge search` first (a worker joins "
                   "an existing study), or pass the URL of the file it created\n")
    assert not db.parent.exists()
    check_storage(f"sqlite:///{db}")  # `evomerge search` may create it


def test_worker_on_an_unreachable_server_prints_one_masked_line(capsys):
    assert main(["worker", "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/db", "--study", "s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and SECRET not in err and "postgresql://u:***@127.0.0.1:1/db" in err


def test_heartbeat_pair_is_checked_with_the_config(family, tmp_path):
    with pytest.raises(ValueError, match=r"grace_s \(30\) must exceed heartbeat_s \(30\)"):
        config(family, tmp_path, heartbeat_s=30, grace_s=30)
    assert not (tmp_path / "run").exists()


def test_run_json_is_private_and_masked(family, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "run.json").chmod(0o644)  # written by an older evomerge
    with Runner(config(family, tmp_path)) as runner:
        runner.open_study()
    assert stat.S_IMODE((run / "run.json").stat().st_mode) == 0o600
    meta = json.loads((run / "run.json").read_text())
    assert meta == {"study_name": "st", "storage": f"sqlite:///{(run / 'study.db').resolve()}"}
    url = RunStorage("url", f"postgresql://u:{SECRET}@h/db", "st")
    assert url.dashboard_command() == "optuna-dashboard postgresql://u:***@h/db"
