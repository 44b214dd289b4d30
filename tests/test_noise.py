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
import datasets, transformers
print(json.dumps({{
    "transformers_bars": transformers.utils.logging.is_progress_bar_enabled(),
    "datasets_bars": datasets.utils.logging.is_progress_bar_enabled(),
    "levels": {{n: logging.getLogger(n).getEffectiveLevel() for n in ("lm_eval", "datasets", "transformers")}},
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
    quiet = probe("logging.basicConfig(level=logging.INFO)\nfrom evomerge.noise import quiet_third_party\n"
                  "quiet_third_party()")
    assert not quiet["transformers_bars"] and not quiet["datasets_bars"]
    assert set(quiet["levels"].values()) == {logging.WARNING}
