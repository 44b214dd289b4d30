"""Every error reaches the user as one ``evomerge: error:`` line (exit 2 bad input, 1 run-time fault); --debug
adds the traceback. Full disks during a search's export and report writing: a real, nearly full 2 MiB tmpfs."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import optuna
import pytest
import yaml
from faults import dead_pid, fill
from tiny_models import tiny_family

import evomerge.merge
from evomerge import outdir
from evomerge.cli import main
from evomerge.engine import MergeError
from evomerge.outdir import format_size
from evomerge.progress import PHASES

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
PROGRESS = re.compile(rf"\S+: ({'|'.join(PHASES)}) ")


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line, which must be the last line of stderr and the only one (progress bars aside, and the line of
    the one trial the fault failed, if any: not a round of failures)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines()  # tqdm bars and the run's display (evomerge.progress) aside
             if line.strip() and "%|" not in line and not PROGRESS.match(line)]
    failed = [line for line in lines if re.match(r"\s*Trial \d+ failed: ", line)]
    assert len(failed) <= 1, err
    lines = [line for line in lines if line not in failed]
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
    assert err.strip().endswith(lines[0])
    return lines[0].removeprefix("evomerge: error: ")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("method: linear\nsources: [{model: a}, {model: b}]\n")
    return path


@pytest.mark.parametrize(("raised", "code", "line"), [
    (MergeError("merge of 'x' produced NaN/Inf"), 1, "merge of 'x' produced NaN/Inf"),
    (OSError(errno.EIO, "Input/output error"), 1, "[Errno 5] Input/output error"),
    (KeyError("model.norm.weight"), 1, "internal error KeyError: 'model.norm.weight' (run with --debug for the "
                                       "traceback and please report it)"),
    (FileExistsError("output dir o already exists"), 2, "output dir o already exists"),
])
def test_error_kinds_and_exit_codes(recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    raised: Exception, code: int, line: str) -> None:
    def merge_to_dir(*_: object, **__: object) -> Path:
        raise raised

    monkeypatch.setattr(evomerge.merge, "merge_to_dir", merge_to_dir)
    assert main(["merge", str(recipe), "--out", "o"]) == code
    assert one_line(capsys) == line


def test_debug_flag_and_env_print_the_traceback(recipe: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    recipe.write_text("method: [linear\n")
    assert main(["--debug", "merge", str(recipe), "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "YamlFileError" in err
    assert err.splitlines()[-1].startswith(f"evomerge: error: {recipe}:2:1: invalid YAML")
    monkeypatch.setenv("EVOMERGE_DEBUG", "1")
    assert main(["merge", str(recipe), "--out", "o"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("EVOMERGE_DEBUG", "0")
    assert main(["merge", str(recipe), "--out", "o"]) == 2
    one_line(capsys)


# --------------------------------------------------------------------------------------------------
# full disks in a search: best_model and the report
# --------------------------------------------------------------------------------------------------


def search_config(tmp_path: Path, run_dir: Path) -> Path:
    base, fts = tiny_family(tmp_path / "family", n=2)
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(dict(
        name="full", base=str(base), sources=[str(f) for f in fts], space=str(SPACES / "task_arithmetic.yaml"),
        evaluator={"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]},
        n_trials=2, baselines=False, out=str(run_dir), device="cpu",
        storage=f"sqlite:///{tmp_path / 'study.db'}")))  # the study beside the disk: only outputs hit the full disk
    return config


def finished(tmp_path: Path) -> int:
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'study.db'}")
    return sum(t.state.is_finished() for t in study.get_trials())


def test_search_export_on_a_full_disk_then_resume(tmp_path: Path, tiny_disk: Path, quiet_optuna: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tiny_disk / "run"
    config = search_config(tmp_path, run_dir)
    filler = fill(tiny_disk / "filler", leave=48 * 1024)  # run.json and the recipes fit, the best model does not
    assert main(["search", str(config)]) == 1
    line = one_line(capsys)
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    assert line.startswith(f"no space left on the device to write {run_dir.resolve() / 'best_model'}: about ")
    assert line.endswith(f"are needed, {format_size(free)} are free there; free some space or choose another path; "
                         "the study 'full' is intact (every finished trial is stored): re-run the same command to "
                         "resume, finished trials are not run again")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best_recipe.mergekit.yaml", "best_recipe.yaml", "run.json"]
    assert finished(tmp_path) == 2
    filler.unlink()
    assert main(["search", str(config)]) == 0
    assert (run_dir / "best_model" / "model.safetensors").is_file() and (run_dir / "report" / "summary.md").is_file()
    assert finished(tmp_path) == 2  # resumed: no trial run again
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_study_database_filling_its_disk_is_one_line_naming_it_then_resume(
        tmp_path: Path, tiny_disk: Path, quiet_optuna: None, capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite's "database or disk is full" (inside Optuna's StorageInternalError) mid-search: the run stops at once
    with one line naming the database file, not a round of generic failures; freed, the same command resumes."""
    config = search_config(tmp_path, tmp_path / "run")
    data = yaml.safe_load(config.read_text())
    db = tiny_disk / "study.db"
    config.write_text(yaml.safe_dump({**data, "n_trials": 16, "storage": f"sqlite:///{db}"}))
    filler = fill(tiny_disk / "filler", leave=150_000)  # the study is created and some trials stored, not 16
    assert main(["search", str(config), "--no-export"]) == 1
    line = one_line(capsys)
    assert line.startswith(f"no space left on the device to write {db}: ") and "(the study database" in line
    assert line.endswith("the study 'full' is intact (every finished trial is stored): re-run the same command to "
                         "resume, finished trials are not run again")
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{db}")
    stored = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())
    assert 0 < stored < 16
    filler.unlink()
    assert main(["search", str(config), "--no-export"]) == 0
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{db}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) == 16


def test_report_on_a_full_disk_is_one_line(tmp_path: Path, tiny_disk: Path, quiet_optuna: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tiny_disk / "run"
    config = search_config(tmp_path, run_dir)
    run_dir.mkdir()
    killed = dead_pid()  # a run killed while exporting left these: cleaned at the start of the next run
    (run_dir / f".best_model.partial-{killed}-{outdir._HOST}-0123abcd").mkdir()
    (run_dir / f".best_model.old-{killed}-{outdir._HOST}-89abcdef").mkdir()
    (run_dir / f".best_model.old-{killed}-{outdir._HOST}-89abcdef" / "model.safetensors").write_text("old")
    (run_dir / "report").mkdir()
    (run_dir / "report" / "summary.md").write_text("the previous report")
    fill(tiny_disk / "filler", leave=24 * 1024)  # the recipes and summary.json fit, the report's plots do not
    assert main(["search", str(config), "--no-export"]) == 1
    line = one_line(capsys)
    # PIL's PNG writer raises a bare ENOSPC (no file name): the message names the run dir and what is free there
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    assert line.startswith(f"no space left on the device to write {run_dir}: {format_size(free)} are free there; ")
    assert line.endswith("the study 'full' is intact (every finished trial is stored): re-run the same command to "
                         "resume, finished trials are not run again")
    assert finished(tmp_path) == 2
    assert (run_dir / "best_model" / "model.safetensors").read_text() == "old"  # restored under its name
    # the report is built aside: the previous one stays whole, nothing half-written is left beside it
    assert [p.name for p in (run_dir / "report").iterdir()] == ["summary.md"]
    assert (run_dir / "report" / "summary.md").read_text() == "the previous report"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_version_and_report_default_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``evomerge --version`` prints the package version; ``evomerge report RUN`` writes into RUN/report."""
    import json
    import subprocess
    import sys

    from test_report import add_trials, new_study

    from evomerge import __version__

    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"evomerge {__version__}"
    run = tmp_path / "run"
    run.mkdir()
    add_trials(new_study(f"sqlite:///{run / 'study.db'}"))
    (run / "run.json").write_text(json.dumps({"study_name": "demo", "storage": f"sqlite:///{run / 'study.db'}"}))
    main(["report", str(run)])
    assert (run / "report" / "summary.md").is_file()
    assert str(run / "report") in capsys.readouterr().out
