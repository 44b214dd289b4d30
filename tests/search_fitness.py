"""Fitness functions for search tests: cheap, deterministic functions of the live model's weights."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CALLS = {"n": 0}


def norm_sum(model: torch.nn.Module, tokenizer: object) -> dict[str, float]:
    """A smooth function of the merged weights: the final norm's sum, and its square as a second metric."""
    value = float(model.model.norm.weight.double().sum())
    return {"norm_sum": value, "neg_square": -value * value}


def neg_norm_sum(model: torch.nn.Module, tokenizer: object) -> float:
    """Minus :func:`norm_sum` (counted in ``CALLS["confirm"]``): a confirmation evaluator that reverses the search's
    ranking, so a test can tell which score picked the result."""
    CALLS["confirm"] = CALLS.get("confirm", 0) + 1
    return -float(model.model.norm.weight.double().sum())


def fails_on_third_call(model: torch.nn.Module, tokenizer: object) -> float:
    CALLS["n"] += 1
    if CALLS["n"] == 3:
        raise RuntimeError("planted evaluation failure")
    return float(model.model.norm.weight.double().sum())


def noisy_by_fidelity(model: torch.nn.Module, tokenizer: object, fidelity: float = 1.0) -> float:
    """The norm sum, offset by the fidelity: low-fidelity scores are lower, as on a subset of harder items."""
    return float(model.model.norm.weight.double().sum()) - (1.0 - fidelity)


def instrumented_norm_sum(model: torch.nn.Module, tokenizer: object) -> dict[str, float]:
    """:func:`norm_sum`, observable from multi-process tests through environment variables (all unset: norm_sum).

    ``EVOMERGE_TEST_LOG=DIR``: every call appends its value (``repr``, exact) to ``DIR/<pid>.calls``.
    ``EVOMERGE_TEST_PEERS=K``: the first call of each process waits (60 s at most) until K processes have logged a
    call, so K concurrent workers are each inside a trial at the same moment.
    ``EVOMERGE_TEST_HANG_AT=N``: call N of this process writes ``DIR/<pid>.hang`` and sleeps for an hour instead of
    returning: a trial that stays RUNNING until the test kills the process.
    """
    CALLS["n"] += 1
    log_dir = os.environ.get("EVOMERGE_TEST_LOG")
    if log_dir is None:
        return norm_sum(model, tokenizer)
    log = Path(log_dir)
    if CALLS["n"] == int(os.environ.get("EVOMERGE_TEST_HANG_AT", 0)):
        (log / f"{os.getpid()}.hang").touch()
        time.sleep(3600)
    metrics = norm_sum(model, tokenizer)
    with open(log / f"{os.getpid()}.calls", "a") as f:
        f.write(f"{metrics['norm_sum']!r}\n")
    peers = int(os.environ.get("EVOMERGE_TEST_PEERS", 0))
    deadline = time.monotonic() + 60
    while CALLS["n"] == 1 and len(list(log.glob("*.calls"))) < peers and time.monotonic() < deadline:
        time.sleep(0.05)
    return metrics


def logged_calls(log_dir: Path) -> dict[int, list[float]]:
    """The values :func:`instrumented_norm_sum` logged in ``log_dir``, by process id."""
    return {int(p.stem): [float(line) for line in p.read_text().split()] for p in log_dir.glob("*.calls")}


def instrumented_env(log_dir: Path, *, peers: int | None = None, hang_at: int | None = None) -> dict[str, str]:
    """The environment of an ``evomerge`` subprocess whose evaluator is :func:`instrumented_norm_sum`: this module
    importable, the hub offline, the log dir, and the barrier / hang settings when given."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "EVOMERGE_TEST_LOG": str(log_dir)}
    for key, value in (("EVOMERGE_TEST_PEERS", peers), ("EVOMERGE_TEST_HANG_AT", hang_at)):
        env.pop(key, None)
        if value is not None:
            env[key] = str(value)
    return env


FAULTS: dict[int, str] = {}


def faulty(model: torch.nn.Module, tokenizer: object) -> float:
    """The norm sum, except on the calls (1-based, counted in ``CALLS``) that :data:`FAULTS` names: ``nan``
    returns NaN, ``raise`` raises RuntimeError, ``exit`` calls sys.exit(3), ``hang`` sleeps for an hour,
    ``interrupt`` raises KeyboardInterrupt (as Ctrl-C would), ``always`` (key 0) raises on every call."""
    CALLS["n"] += 1
    fault = FAULTS.get(CALLS["n"], FAULTS.get(0))
    if fault == "nan":
        return float("nan")
    if fault in ("raise", "always"):
        raise RuntimeError(f"planted failure at call {CALLS['n']}\nsecond line of the message")
    if fault == "exit":
        raise SystemExit(3)
    if fault == "hang":
        time.sleep(3600)
    if fault == "interrupt":
        raise KeyboardInterrupt
    return float(model.model.norm.weight.double().sum())


def search_settings(family: tuple[str, list[str]], out: Path, **overrides: object) -> dict[str, object]:
    """A run config (as a dict) of a small search on ``family`` (base, fine-tunes) into ``out``: the task arithmetic
    space, :func:`norm_sum` as evaluator, CPU; ``overrides`` replace any key."""
    base, fts = family
    spaces = Path(__file__).resolve().parent.parent / "search_spaces"
    return {"name": "search", "base": base, "sources": fts, "space": str(spaces / "task_arithmetic.yaml"),
            "evaluator": {"type": "callable", "function": "search_fitness:norm_sum", "metrics": ["norm_sum"]},
            "n_trials": 2, "out": str(out), "device": "cpu", **overrides}
