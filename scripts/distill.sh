#!/usr/bin/env bash
# SD-Zero Phase 2: on-policy self-distillation from the SRT teacher (python -m self_distillation.train).
#
#   OUTPUT_DIR=runs/distill SRT_DIR=runs/srt TRAIN_DATASET=data/train.jsonl bash scripts/distill.sh
#   RAY_ADDRESS=auto OUTPUT_DIR=... bash scripts/distill.sh      # join an existing Ray cluster (multi-node)
#
# The teacher and (by default) the student start from the SRT model: $SRT_DIR/stage2/final (scripts/sft.sh's
# output). Rerun the same command to resume from the newest checkpoint. Extra arguments pass through as
# dotted overrides. Outputs: $OUTPUT_DIR/{config.yaml,metrics.jsonl,checkpoints/,final/}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${OUTPUT_DIR:?set OUTPUT_DIR}"
: "${SRT_DIR:=${CKPT_ROOT:-}}"                         # scripts/sft.sh's CKPT_ROOT
: "${TEACHER_MODEL:=${SRT_DIR:+$SRT_DIR/stage2/final}}"
: "${TEACHER_MODEL:?set TEACHER_MODEL (the SRT final/ dir) or SRT_DIR}"
: "${STUDENT_MODEL:=$TEACHER_MODEL}"                    # the student is initialised from the SRT model
: "${TRAIN_DATASET:?set TRAIN_DATASET (.jsonl/.json/.parquet file or HF dataset name)}"
: "${VAL_DATASET:=}"                                    # empty = no validation
: "${MAX_TOTAL_SEQUENCE_LENGTH:=8192}" "${MAX_TEACHER_TOKENS:=32768}"
: "${NUM_PROMPTS_PER_STEP:=128}" "${NUM_GENERATIONS_PER_PROMPT:=1}" "${TRAIN_GLOBAL_BATCH_SIZE:=0}"
: "${MICRO_BATCH_SIZE:=1}" "${MAX_NUM_STEPS:=1000}" "${MAX_NUM_EPOCHS:=5}" "${LR:=5e-6}" "${TOPK:=64}"
: "${KL_TYPE:=mixed}" "${MIXED_KL_WEIGHT:=0.5}" "${TEACHER_SYNC_EVERY:=0}" "${VAL_PERIOD:=20}"
: "${TEACHER_CONTEXT:=self_revision}"                   # what the teacher reads before y
: "${REWARD:=ground_truth}"                             # where r comes from
: "${OBJECTIVE:=distillation}"                          # what the learner minimises
: "${SAVE_PERIOD:=10}" "${NUM_GPUS:=$(knob_gpu_count)}" "${NUM_NODES:=1}"
: "${NUM_LEARNERS:=$(( NUM_GPUS > 0 ? NUM_GPUS * NUM_NODES : 1 ))}"
: "${CONFIG:=configs/phase2_distill.yaml}"
: "${PYTHON:=$(knob_python)}"

for k in MAX_TOTAL_SEQUENCE_LENGTH MAX_TEACHER_TOKENS NUM_PROMPTS_PER_STEP NUM_GENERATIONS_PER_PROMPT \
  MICRO_BATCH_SIZE MAX_NUM_STEPS MAX_NUM_EPOCHS NUM_NODES NUM_LEARNERS; do knob_pos_int "$k"; done
for k in TRAIN_GLOBAL_BATCH_SIZE TEACHER_SYNC_EVERY VAL_PERIOD SAVE_PERIOD NUM_GPUS; do knob_int "$k"; done
knob_float LR; knob_float MIXED_KL_WEIGHT
[[ "$TOPK" == null ]] || knob_pos_int TOPK
knob_choice KL_TYPE forward reverse mixed jsd
knob_choice TEACHER_CONTEXT self_revision
knob_choice REWARD ground_truth
knob_choice OBJECTIVE distillation
[[ -f "$CONFIG" ]] || knob_fail CONFIG "does not exist"

echo "distill.sh: settings"
knob_print OUTPUT_DIR STUDENT_MODEL TEACHER_MODEL TRAIN_DATASET VAL_DATASET MAX_TOTAL_SEQUENCE_LENGTH \
  MAX_TEACHER_TOKENS NUM_PROMPTS_PER_STEP NUM_GENERATIONS_PER_PROMPT TRAIN_GLOBAL_BATCH_SIZE MICRO_BATCH_SIZE \
  MAX_NUM_STEPS MAX_NUM_EPOCHS LR TOPK KL_TYPE MIXED_KL_WEIGHT TEACHER_SYNC_EVERY VAL_PERIOD SAVE_PERIOD \
  TEACHER_CONTEXT REWARD OBJECTIVE \
  NUM_GPUS NUM_NODES NUM_LEARNERS CONFIG PYTHON

export TOKENIZERS_PARALLELISM=false
if (( NUM_GPUS == 0 )); then  # vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" KMP_BLOCKTIME="${KMP_BLOCKTIME:-0}"
fi
# the loss compares distributions id by id: refuse different tokenizers before any actor starts
"$PYTHON" -c "import sys; from self_distillation.train import check_tokenizers; check_tokenizers(sys.argv[1], sys.argv[2])" \
  "$STUDENT_MODEL" "$TEACHER_MODEL"
args=(student.path="$STUDENT_MODEL" teacher.path="$TEACHER_MODEL" train_data.path="$TRAIN_DATASET"
  max_total_sequence_length="$MAX_TOTAL_SEQUENCE_LENGTH" max_teacher_tokens="$MAX_TEACHER_TOKENS"
  num_prompts_per_step="$NUM_PROMPTS_PER_STEP" num_generations_per_prompt="$NUM_GENERATIONS_PER_PROMPT"
  train_global_batch_size="$TRAIN_GLOBAL_BATCH_SIZE" micro_batch_size="$MICRO_BATCH_SIZE"
  max_num_steps="$MAX_NUM_STEPS" max_num_epochs="$MAX_NUM_EPOCHS" optim.lr="$LR" loss.top_k="$TOPK"
  loss.kl_type="$KL_TYPE" loss.mixed_kl_weight="$MIXED_KL_WEIGHT" teacher_sync_every="$TEACHER_SYNC_EVERY"
  val_period="$VAL_PERIOD" save_period="$SAVE_PERIOD" ray.num_gpus="$(( NUM_GPUS * NUM_NODES ))"
  teacher_context="$TEACHER_CONTEXT" reward="$REWARD" objective="$OBJECTIVE"
  ray.num_learners="$NUM_LEARNERS" output_dir="$OUTPUT_DIR")
[[ -n "$VAL_DATASET" ]] && args+=(val_data.path="$VAL_DATASET")
exec "$PYTHON" -m self_distillation.train --config "$CONFIG" "${args[@]}" "$@"
