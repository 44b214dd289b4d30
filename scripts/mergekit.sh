#!/usr/bin/env bash
# Install mergekit 0.1.5 (the version evomerge's parity is stated against) into its own venv: mergekit pins its own
# torch/transformers/pydantic, which fight evomerge's, so it is called as an external tool (tests/mergekit_tool.py,
# the benchmarks' --mergekit-bin). The venv: $EVOMERGE_MERGEKIT_VENV, default /tmp/venv-bench (where the tests and
# benchmarks look first). Idempotent: a venv that already runs mergekit-yaml is left as it is.
set -euo pipefail
venv="${EVOMERGE_MERGEKIT_VENV:-/tmp/venv-bench}"
if [ -x "$venv/bin/mergekit-yaml" ] && "$venv/bin/python" -c "import mergekit" 2>/dev/null; then
  exit 0
fi
"${PYTHON:-python3}" -m venv "$venv"
# a CPU build of torch 2.13.0 where it lies on disk (as scripts/bootstrap.sh takes it), else what pip finds
"$venv/bin/pip" install -q "torch==2.13.0" 2>/dev/null || "$venv/bin/pip" install -q torch
"$venv/bin/pip" install -q "mergekit==0.1.5"
"$venv/bin/mergekit-yaml" --help >/dev/null
