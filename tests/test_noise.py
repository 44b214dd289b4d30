"""Third-party noise is off unless --verbose: the libraries' progress bars and INFO loggers (evomerge.noise)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

PROBE = """
import json, logging, sys
{setup}
import datasets, optuna, transformers
print(json.dumps({{
    "transformers_bars": transformers.utils.logging.is_progress_bar_enabled(),
    "datasets_bars": datasets.utils.logging.is_progress_bar_enabled(),
    "levels": {{n: logging.getLogger(n).getEffectiveLevel() for n in ("lm_eval", "datasets", "transformers",
                                                                     "optuna")}},
}}))
"""


def probe(setup: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS",
                                                              "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quiet_third_party_turns_bars_and_info_lines_off():
    loud = probe("logging.basicConfig(level=logging.INFO)")  # what the CLI had with --verbose (DEBUG: also loud)
    assert loud["transformers_bars"] and loud["datasets_bars"]
    assert loud["levels"]["lm_eval"] == logging.INFO  # "Building contexts ..." lines
    assert loud["levels"]["optuna"] == logging.INFO  # "A new study created ..." (Optuna sets it when imported)
    quiet = probe("logging.basicConfig(level=logging.INFO)\nfrom evomerge.noise import quiet_third_party\n"
                  "quiet_third_party()")
    assert not quiet["transformers_bars"] and not quiet["datasets_bars"]
    assert set(quiet["levels"].values()) == {logging.WARNING}


BUILD = """
import sys
{setup}
from evomerge.evaluate import LmEvalEvaluator
LmEvalEvaluator([{task!r}], include_path={tasks!r}, include_defaults=False)
"""


def test_lm_evals_building_contexts_bar_is_off_unless_verbose(mini_zoo, capfd):
    """lm-eval's "Building contexts" tqdm bar (the requests are built when the evaluator is made): shown in a process
    that did not quieten the libraries (this one), absent from stderr after quiet_third_party (a fresh process:
    tqdm reads its switch when imported)."""
    from evomerge.evaluate import LmEvalEvaluator
    from evomerge.zoo.taskfiles import lm_eval_name

    task = lm_eval_name(next(iter(mini_zoo.experts)))
    LmEvalEvaluator([task], include_path=str(mini_zoo.task_dir), include_defaults=False)
    assert "%|" in capfd.readouterr().err  # the bar, as a run with --verbose shows it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    script = BUILD.format(setup="from evomerge.noise import quiet_third_party\nquiet_third_party()", task=task,
                          tasks=str(mini_zoo.task_dir))
    quiet = subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True, text=True, timeout=300,
                           check=True)
    assert "%|" not in quiet.stderr and "Building contexts" not in quiet.stderr, quiet.stderr[-2000:]
