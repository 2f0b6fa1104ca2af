#!/usr/bin/env bash
# The project's test command (README, CI): every test whose resources exist on this machine, offline.
#   bash scripts/test.sh                 # all CPU tests (unit + vllm/ray/slow integration)
#   bash scripts/test.sh tests/unit -x   # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VENV_DIR:=.venv}"
[[ -x "$VENV_DIR/bin/python" ]] || { echo "test.sh: no virtualenv at $VENV_DIR; run: bash scripts/setup.sh" >&2; exit 1; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile (engine start ~2 s, not ~15 s)
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 TORCH_COMPILE_DISABLE=1
# GPU tests skip themselves without a GPU; everything else runs (pyproject's addopts hides the
# integration markers from a bare `pytest`, this -m brings them back).
exec "$VENV_DIR/bin/python" -m pytest -m "not gpu or gpu" "$@"
