"""The one progress display of a run (evomerge.progress): every phase named in order on stderr with its count,
nothing of it with --quiet, the result line on stdout."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from search_fitness import search_settings
from tiny_models import tiny_family

from evomerge.cli import main
from evomerge.progress import _POLL_S, LOG_TICK_S, PHASES, TTY_TICK_S, RunProgress

NORM_SUM = {"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_family(tmp_path_factory.mktemp("progress-family"), n=3)
    return str(base), [str(f) for f in fts]


def phases(err: str, name: str) -> list[tuple[str, str]]:
    """(phase, its last line) for each phase the display showed, in order; tqdm repeats a live line on every refresh
    (``\\r``-separated: ``splitlines`` splits them), so a phase is one entry however often it was drawn."""
    shown: list[tuple[str, str]] = []
    pattern = re.compile(rf"{re.escape(name)}: ({'|'.join(PHASES)}) ")
    for line in err.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        if shown and shown[-1][0] == match.group(1):
            shown[-1] = (match.group(1), line)
        else:
            shown.append((match.group(1), line))
    return shown


def count_of(line: str) -> tuple[int, int]:
    done, total = re.search(r"\| (\d+)/(\d+) \[", line).groups()
    return int(done), int(total)


def run_cli(tmp_path: Path, command: str, data: dict, *flags: str) -> None:
    """``evomerge [flags] command CONFIG`` with ``data`` as the config, its None values left out."""
    config = tmp_path / f"{command}.yaml"
    config.write_text(yaml.safe_dump({key: value for key, value in data.items() if value is not None}))
    assert main([*flags, command, str(config)]) == 0


def test_a_search_names_every_phase_in_order_with_its_count(family, tmp_path, capsys):
    data = search_settings(family, tmp_path / "run", name="s", n_trials=3, seed=1, confirm_top=2,
                           confirm_evaluator=NORM_SUM)
    run_cli(tmp_path, "search", data)
    out, err = capsys.readouterr()
    shown = phases(err, "s")
    assert [phase for phase, _ in shown] == ["load models", "baselines", "search trials", "confirm", "test scoring",
                                            "export", "report"], err[-3000:]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    trials = study.get_trials()
    baselines = sum(t.user_attrs["kind"].startswith("baseline:") for t in trials)
    tested = sum(key.startswith("test:") for key in study.user_attrs)
    lines = dict(shown)
    # each counted phase ends complete: the queued baselines, n_trials searched trials, confirm_top re-scores, the
    # test-split scores the study stored
    assert count_of(lines["baselines"]) == (baselines, baselines) and baselines == len(trials) - 3
    assert count_of(lines["search trials"]) == (3, 3) and "best=" in lines["search trials"]
    assert count_of(lines["confirm"]) == (2, 2)
    assert count_of(lines["test scoring"]) == (tested, tested)
    assert re.fullmatch(r"s: export \[\d\d:\d\d\]", lines["export"])
    # the result line goes to stdout, alone
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best_trial"]
    assert out.splitlines() == [f"best trial {best}: validation {study.trials[best].value:.4f}; report: "
                                f"{tmp_path / 'run' / 'report' / 'summary.md'}"]


@pytest.mark.parametrize(("command", "overrides", "expected"), [
    ("soup", {"space": None, "base": None}, ["load models", "soup steps", "test scoring", "export", "report"]),
    ("sweep", {"space": None, "n_trials": None, "sweep": {"task_arithmetic": {"lambda": [0.5, 1.0]}}},
     ["load models", "sweep trials", "test scoring", "report"]),
])
def test_soups_and_sweeps_name_their_phases(family, tmp_path, capsys, command, overrides, expected):
    run_cli(tmp_path, command, search_settings(family, tmp_path / "run", name="r", **overrides))
    out, err = capsys.readouterr()
    shown = phases(err, "r")
    assert [phase for phase, _ in shown] == expected, err[-3000:]
    steps = dict(shown)[expected[1]]
    assert count_of(steps)[0] == count_of(steps)[1]
    assert len(out.splitlines()) == 1 and "report: " in out


def test_quiet_prints_no_phase(family, tmp_path, capsys):
    run_cli(tmp_path, "search", search_settings(family, tmp_path / "run", name="q", n_trials=2, seed=1), "--quiet")
    out, err = capsys.readouterr()
    # (transformers' own "Loading weights" bar may show here: this process imported it before the CLI quietened it;
    # tests/test_noise.py checks the libraries' noise in fresh processes)
    assert phases(err, "q") == [] and "q: " not in err and not any(phase in err for phase in PHASES), err
    assert out.startswith("best trial ") and len(out.splitlines()) == 1


def test_a_phase_that_fails_leaves_its_line_and_no_live_bar(capsys):
    progress = RunProgress("p")
    with pytest.raises(RuntimeError), progress.phase("test scoring", 4, unit="recipe") as bar:
        bar.update(1)
        raise RuntimeError("boom")
    assert progress.bar is None and progress.label is None
    err = capsys.readouterr().err
    assert err.endswith("\n") and count_of(phases(err, "p")[-1][1]) == (1, 4)
    with pytest.raises(ValueError, match="unknown phase 'scoring'"):
        progress.start("scoring")


def test_evomerge_merge_names_its_phases_with_the_tensor_count(family, tmp_path, capsys):
    """`evomerge merge` on stderr: a merge tensor by tensor counts each tensor as it is merged (and written); a layer
    stack reads its layers first and counts the tensors written; --quiet shows no phase; stdout the result alone."""
    from safetensors import safe_open

    from evomerge.recipe import Recipe, StackRecipe

    base, fts = family
    recipes = {"merged": Recipe(method="task_arithmetic", base=base, sources=[{"model": f} for f in fts]),
               "stacked": StackRecipe(slices=[{"model": fts[0], "layer_range": [0, 2]},
                                              {"model": fts[1], "layer_range": [1, 2]}])}
    expected = {"merged": ["read sources", "merge tensors", "model card"],
                "stacked": ["read sources", "write shards", "model card"]}
    for name, recipe in recipes.items():
        recipe.to_yaml(tmp_path / f"{name}.yaml")
        assert main(["merge", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        out, err = capsys.readouterr()
        shown = phases(err, name)
        assert [phase for phase, _ in shown] == expected[name], err
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            tensors = len(list(f.keys()))
        assert count_of(dict(shown)[expected[name][1]]) == (tensors, tensors)
        assert re.fullmatch(rf"{name}: model card \[\d\d:\d\d\]", dict(shown)["model card"])
        assert out.splitlines() == [f"merged model written to {tmp_path / name}"]
    assert main(["--quiet", "merge", str(tmp_path / "merged.yaml"), "--out", str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert phases(err, "q") == [] and not any(phase in err for phase in PHASES), err
    assert out.splitlines() == [f"merged model written to {tmp_path / 'q'}"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_live_phase_redraws_its_elapsed_time_and_eta_while_no_count_moves(capsys):
    """One test-split score taking minutes: the line still moves, its elapsed time and its ETA (3 recipes left at
    the 10 s the first took) redrawn; in a log (capsys' stderr is no terminal) at most once a minute, by the ticker
    thread as by tick()."""
    clock = FakeClock()
    progress = RunProgress("p", clock=clock)
    progress.start("test scoring", 4, unit="recipe")
    assert progress.tick_s == LOG_TICK_S
    clock.now += 10
    progress.advance()
    capsys.readouterr()
    clock.now += LOG_TICK_S - 1  # 69 s: drawn 59 s ago, not yet
    assert not progress.tick()
    time.sleep(2 * _POLL_S)  # the ticker thread does not draw either
    assert capsys.readouterr().err == ""
    clock.now += 1
    progress.tick()  # whichever draws first, the thread or this call
    assert count_of(capsys.readouterr().err.split("\r")[-1]) == (1, 4)
    clock.now += LOG_TICK_S
    err = ""
    for _ in range(40):  # the thread alone, within a few polls
        time.sleep(_POLL_S / 2)
        err += capsys.readouterr().err
        if "02:10<00:30" in err:
            break
    assert "p: test scoring" in err and "1/4 [02:10<00:30" in err, err
    progress.end()
    assert progress._ticker is None


def test_on_a_terminal_a_timed_phase_ticks_every_second(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    clock = FakeClock()
    progress = RunProgress("t", clock=clock)
    with progress.phase("export"):
        assert progress.tick_s == TTY_TICK_S
        clock.now += 75
        progress.tick()
        assert sys.stderr.getvalue().split("\r")[-1].startswith("t: export [01:15]")
    quiet = RunProgress("t", enabled=False, clock=clock)
    with quiet.phase("export"):
        clock.now += 75
        assert not quiet.tick() and quiet._ticker is None
