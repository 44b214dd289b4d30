#!/usr/bin/env bash
# The demo, end to end on the built-in tiny model zoo: install, build the zoo (trained locally, offline,
# deterministic; reused when already built), print its score table, then merge the zoo's experts.
# Pass --mini for the ~1-minute zoo used by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m evomerge.demo "$@"
