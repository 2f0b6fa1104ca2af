#!/usr/bin/env bash
# Phase 1b: two-stage Self-Revision Training (completion-only SFT with FSDP2) under torchrun.
# Stage 1 trains x -> y_init + P_r + y_revised; Stage 2 starts from Stage 1's final/ and trains the revision.
#
#   TRAIN_DATA_DIR=runs/collect/data CKPT_ROOT=runs/srt bash scripts/sft.sh            # all local GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 TRAIN_DATA_DIR=... CKPT_ROOT=/shared/srt \
#     bash scripts/sft.sh                                                               # on each node
#   CONFIG_STAGE1=configs/tiny/sft.yaml CONFIG_STAGE2=configs/tiny/sft.yaml BASE_MODEL=tiny_dir ... # CPU
#   STAGES=one TRAIN_FILE=runs/rft/samples/sft.jsonl CKPT_ROOT=runs/rft bash scripts/sft.sh   # RFT / SSD data
# STAGES=one trains plain prompt/completion data (data.layout=prompt_completion, run_srt_data.sh STRATEGY=
# rejection|ssd) in one stage with the Stage-1 settings (LR_STAGE1, EPOCHS_STAGE1, CONFIG_STAGE1) into
# $CKPT_ROOT/sft.
#
# Re-running resumes: a stage whose final/ exists is skipped, otherwise training continues from its latest
# checkpoint (settings that change the data or the objective are refused; see the README's "Resuming and
# changing settings"). Killing this script (Ctrl-C, kill, kill -9) stops torchrun and its ranks. Outputs: $CKPT_ROOT/stage{1,2}/{config.yaml,metrics.jsonl,checkpoints/,final/}; the SRT
# model (input to Phase 2) is $CKPT_ROOT/stage2/final.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${BASE_MODEL:=Qwen/Qwen3-4B-Instruct-2507}"
: "${STAGES:=two}"                                  # two (SRT: stage 1 then stage 2) | one (plain SFT)
knob_choice STAGES two one
if [[ "$STAGES" == one && -n "${TRAIN_FILE:-}" ]]; then : "${TRAIN_DATA_DIR:=$(dirname "$TRAIN_FILE")}"; fi
: "${TRAIN_DATA_DIR:?set TRAIN_DATA_DIR to the directory written by prepare_data}"
: "${TRAIN_FILE:=${TRAIN_DATA_DIR}/sft.jsonl}"
: "${CKPT_ROOT:?set CKPT_ROOT (stages go to \$CKPT_ROOT/stage1 and \$CKPT_ROOT/stage2)}"
: "${DATA_PREFIX:=srt}"
: "${STAGE1_FILE:=${TRAIN_DATA_DIR}/${DATA_PREFIX}_stage1.jsonl}"
: "${STAGE2_FILE:=${TRAIN_DATA_DIR}/${DATA_PREFIX}_stage2.jsonl}"
: "${CONFIG_STAGE1:=configs/phase1_sft_stage1.yaml}"
: "${CONFIG_STAGE2:=configs/phase1_sft_stage2.yaml}"
: "${LR_STAGE1:=5e-6}"
: "${LR_STAGE2:=5e-6}"
: "${EPOCHS_STAGE1:=3}"
: "${EPOCHS_STAGE2:=3}"
: "${MAX_LENGTH:=32768}"
: "${MICRO_BATCH_SIZE:=1}"
: "${GRAD_ACCUM:=1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(knob_gpu_count)
  [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1   # CPU: one process (gloo)
fi
: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=127.0.0.1}"
: "${MASTER_PORT:=$((20000 + RANDOM % 40000))}"
: "${MAX_STEPS:=-1}"
: "${SAVE_EVERY:=1000}"
: "${EXTRA_ARGS:=}"
: "${PYTHON:=$(knob_python)}"

for knob in EPOCHS_STAGE1 EPOCHS_STAGE2 MAX_LENGTH MICRO_BATCH_SIZE GRAD_ACCUM NPROC_PER_NODE NNODES; do
  knob_pos_int "$knob"
done
for knob in NODE_RANK MASTER_PORT SAVE_EVERY; do knob_int "$knob"; done
[[ "$MAX_STEPS" == -1 ]] || knob_pos_int MAX_STEPS
for knob in LR_STAGE1 LR_STAGE2; do knob_float "$knob"; done
files=(STAGE1_FILE STAGE2_FILE CONFIG_STAGE1 CONFIG_STAGE2); [[ "$STAGES" == one ]] && files=(TRAIN_FILE CONFIG_STAGE1)
for knob in "${files[@]}"; do
  [[ -f "${!knob}" ]] || knob_fail "$knob" "does not exist"
done
command -v "$PYTHON" >/dev/null || knob_fail PYTHON "not found"

echo "sft.sh: settings"
knob_print STAGES BASE_MODEL TRAIN_DATA_DIR TRAIN_FILE DATA_PREFIX STAGE1_FILE STAGE2_FILE CONFIG_STAGE1 CONFIG_STAGE2 LR_STAGE1 \
  LR_STAGE2 EPOCHS_STAGE1 EPOCHS_STAGE2 MAX_LENGTH MICRO_BATCH_SIZE GRAD_ACCUM NPROC_PER_NODE NNODES NODE_RANK \
  MASTER_ADDR MASTER_PORT CKPT_ROOT MAX_STEPS SAVE_EVERY EXTRA_ARGS PYTHON

run_stage() {  # stage model data_file lr epochs config [name extra-override]
  local stage=$1 model=$2 data=$3 lr=$4 epochs=$5 config=$6 out="$CKPT_ROOT/${7:-stage$1}" layout=${8:-}
  if [[ -f "$out/final/config.json" ]]; then
    echo "sft.sh: stage $stage already finished ($out/final); delete it to retrain"
    return
  fi
  echo "sft.sh: stage $stage: $model -> $out/final"
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of dotted overrides
  knob_spawn "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m self_revision_training.sft --config "$config" stage="$stage" model.path="$model" \
    data.train_file="$data" output_dir="$out" lr="$lr" epochs="$epochs" max_length="$MAX_LENGTH" \
    micro_batch_size="$MICRO_BATCH_SIZE" grad_accum="$GRAD_ACCUM" max_steps="$MAX_STEPS" \
    save_every="$SAVE_EVERY" $layout $EXTRA_ARGS
  knob_wait "$KNOB_PID" || { echo "sft.sh: stage $stage failed" >&2; exit 1; }
}

if [[ "$STAGES" == one ]]; then
  run_stage 1 "$BASE_MODEL" "$TRAIN_FILE" "$LR_STAGE1" "$EPOCHS_STAGE1" "$CONFIG_STAGE1" sft data.layout=prompt_completion
  echo "sft.sh: done; model at $CKPT_ROOT/sft/final"
  exit 0
fi
run_stage 1 "$BASE_MODEL" "$STAGE1_FILE" "$LR_STAGE1" "$EPOCHS_STAGE1" "$CONFIG_STAGE1"
run_stage 2 "$CKPT_ROOT/stage1/final" "$STAGE2_FILE" "$LR_STAGE2" "$EPOCHS_STAGE2" "$CONFIG_STAGE2"
echo "sft.sh: done; SRT model at $CKPT_ROOT/stage2/final"
