#!/usr/bin/env bash
# Phase 2: on-policy self-distillation (python -m self_distillation.train), for every method preset.
#
#   OUTPUT_DIR=runs/distill SRT_DIR=runs/srt TRAIN_DATASET=data/train.jsonl bash scripts/distill.sh       # SD-Zero
#   METHOD=opsd OUTPUT_DIR=runs/opsd BASE_MODEL=Qwen/Qwen3-1.7B TRAIN_DATASET=data/math.jsonl bash scripts/distill.sh
#   RAY_ADDRESS=auto OUTPUT_DIR=... bash scripts/distill.sh      # join an existing Ray cluster (multi-node)
#
# METHOD picks the preset (configs/<preset>.yaml): sd-zero (configs/phase2_distill.yaml; the teacher and, by
# default, the student are the SRT model $SRT_DIR/stage2/final, scripts/sft.sh's output), opsd
# (configs/opsd.yaml; OPSD's current recipe: student = teacher = BASE_MODEL, the teacher reads the
# dataset's reference solution; no Phase 1) or grpo (configs/grpo.yaml; the RL baseline from BASE_MODEL,
# no teacher unless grpo.kl_coef > 0, whose reference is TEACHER_MODEL = BASE_MODEL). Every other knob is unset by default and then keeps the
# preset's value; a knob that is set overrides it. Extra arguments pass through as dotted overrides.
# Rerun the same command to resume. Outputs: $OUTPUT_DIR/{config.yaml,metrics.jsonl,checkpoints/,final/}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${METHOD:=sd-zero}"                                  # sd-zero | opsd | grpo
knob_choice METHOD sd-zero opsd grpo
: "${OUTPUT_DIR:?set OUTPUT_DIR}"
if [[ "$METHOD" == sd-zero ]]; then
  : "${CONFIG:=configs/phase2_distill.yaml}"
  : "${SRT_DIR:=${CKPT_ROOT:-}}"                       # scripts/sft.sh's CKPT_ROOT
  : "${TEACHER_MODEL:=${SRT_DIR:+$SRT_DIR/stage2/final}}"
  : "${TEACHER_MODEL:?set TEACHER_MODEL (the SRT final/ dir) or SRT_DIR}"
  : "${STUDENT_MODEL:=$TEACHER_MODEL}"                  # the student is initialised from the SRT model
else
  : "${CONFIG:=configs/$METHOD.yaml}"
  : "${BASE_MODEL:=${STUDENT_MODEL:-}}"
  : "${BASE_MODEL:?set BASE_MODEL (student = teacher = the base model)}"
  : "${STUDENT_MODEL:=$BASE_MODEL}" "${TEACHER_MODEL:=$BASE_MODEL}"
fi
: "${TRAIN_DATASET:?set TRAIN_DATASET (.jsonl/.json/.parquet file or HF dataset name)}"
: "${VAL_DATASET:=}"                                    # empty = no validation
: "${NUM_GPUS:=$(knob_gpu_count)}" "${NUM_NODES:=1}"
: "${NUM_LEARNERS:=$(( NUM_GPUS > 0 ? NUM_GPUS * NUM_NODES : 1 ))}"
: "${PYTHON:=$(knob_python)}"
# knob (config key, check): unset = the preset's value
KNOBS=(
  "MAX_TOTAL_SEQUENCE_LENGTH max_total_sequence_length pos_int" "MAX_TEACHER_TOKENS max_teacher_tokens pos_int"
  "NUM_PROMPTS_PER_STEP num_prompts_per_step pos_int" "NUM_GENERATIONS_PER_PROMPT num_generations_per_prompt pos_int"
  "TRAIN_GLOBAL_BATCH_SIZE train_global_batch_size int" "MICRO_BATCH_SIZE micro_batch_size pos_int"
  "MAX_NUM_STEPS max_num_steps pos_int" "MAX_NUM_EPOCHS max_num_epochs pos_int" "LR optim.lr float"
  "MAX_SAMPLES max_samples int"
  "TOPK loss.top_k topk" "KL_TYPE loss.kl_type choice:forward,reverse,mixed,jsd"
  "MIXED_KL_WEIGHT loss.mixed_kl_weight float" "TEACHER_MODE teacher_mode choice:frozen,sync,ema,live"
  "TEACHER_SYNC_EVERY teacher_sync_every int" "TEACHER_EMA_DECAY teacher_ema_decay float"
  "TEACHER_CONTEXT teacher_context choice:self_revision,reference_solution,revision_with_solution,successful_sibling,none"
  "REWARD reward choice:ground_truth,majority_vote,none" "VOTE_THRESHOLD vote.threshold float"
  "OBJECTIVE objective choice:distillation,grpo"
  "TRUNCATED_ROLLOUTS truncated_rollouts choice:distill,drop" "VAL_PERIOD val_period int"
  "SAVE_PERIOD save_period int" "NUM_ROLLOUT_ENGINES ray.num_rollout_engines pos_int"
  "ROLLOUT_TP_SIZE ray.rollout_tp_size int" "ASYNC_ROLLOUTS async_rollouts choice:0,1"
  "WEIGHT_SYNC ray.weight_sync choice:memory,file" "TEACHER_PACK_TOKENS teacher_pack_tokens int"
  "PACKING packing choice:true,false"
)
[[ -f "$CONFIG" ]] || knob_fail CONFIG "does not exist"
knob_pos_int NUM_NODES; knob_pos_int NUM_LEARNERS; knob_int NUM_GPUS
: "${MODE:=math}"                                       # math (math-verify) | code (tests in the sandbox)
knob_choice MODE math code
knob_overrides  # args=(key=value ...) for every set knob in KNOBS, each checked

echo "distill.sh: METHOD=$METHOD preset $CONFIG; set knobs override it:"
knob_print OUTPUT_DIR STUDENT_MODEL TEACHER_MODEL TRAIN_DATASET VAL_DATASET MODE NUM_GPUS NUM_NODES NUM_LEARNERS PYTHON
for spec in "${KNOBS[@]}"; do read -r name _ <<< "$spec"; [[ -z "${!name-}" ]] || knob_print "$name"; done

export TOKENIZERS_PARALLELISM=false
if (( NUM_GPUS == 0 )); then  # vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" KMP_BLOCKTIME="${KMP_BLOCKTIME:-0}"
fi
# the loss compares distributions id by id: refuse different tokenizers before any actor starts
"$PYTHON" -c "import sys; from self_distillation.train import check_tokenizers; check_tokenizers(sys.argv[1], sys.argv[2])" \
  "$STUDENT_MODEL" "$TEACHER_MODEL"
args+=(student.path="$STUDENT_MODEL" teacher.path="$TEACHER_MODEL" train_data.path="$TRAIN_DATASET"
  train_data.mode="$MODE" val_data.mode="$MODE" ray.num_gpus="$(( NUM_GPUS * NUM_NODES ))"
  ray.num_learners="$NUM_LEARNERS" output_dir="$OUTPUT_DIR")
[[ -n "$VAL_DATASET" ]] && args+=(val_data.path="$VAL_DATASET")
exec "$PYTHON" -m self_distillation.train --config "$CONFIG" "${args[@]}" "$@"
