#!/usr/bin/env bash
# Install everything into .venv and run the default (fast) test suite.
# Extra pytest arguments pass through, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev,distributed
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
