#!/usr/bin/env bash
# UNDO, the iterative outer loop (python -m self_distillation.undo): evaluate the student, show the teacher its
# answers, scores and validation errors, keep the verified rationales, SFT, stop when validation stops improving.
#
#   OUTPUT_DIR=runs/undo SRT_DIR=runs/srt TRAIN_DATASET=data/train.jsonl VAL_DATASET=data/val.jsonl \
#     TEST_DATASET=data/test.jsonl bash scripts/undo.sh                        # teacher = the SRT model
#   TEACHER_MODEL=Qwen/Qwen3-30B-A3B-Instruct-2507 STUDENT_MODEL=Qwen/Qwen2.5-Math-1.5B-Instruct ... bash scripts/undo.sh
#   INNER=distill SRT_DIR=runs/srt OUTPUT_DIR=runs/sdzero_iter ... bash scripts/undo.sh   # iterative self-evolution
#   CONFIG=configs/quickstart/undo.yaml NUM_GPUS=0 ... bash scripts/undo.sh                 # CPU (embedded model)
#
# INNER=sft (UNDO): iteration k = S_{k-1} answers the training problems -> the teacher (TEACHER_MODEL, by default
# $SRT_DIR/stage2/final; any HF model with its own tokenizer) regenerates a rationale per problem (TEMPLATE) ->
# verified ones are kept -> one-stage SFT from STUDENT_INIT (base = STUDENT_MODEL, previous = S_{k-1}) ->
# validation. INNER=distill: each iteration is a Phase-2 run (self_distillation.train) whose teacher is the best
# student so far (iteration 1: the SRT model, which is also the student). Stops after PATIENCE iterations without a
# better validation accuracy or at MAX_ITERATIONS; $OUTPUT_DIR/best links the best iteration's model and
# summary.json names it. Every knob left unset keeps CONFIG's value. Extra arguments pass through as dotted
# overrides (e.g. sft.overrides.lr=1e-5). Rerun the same command to resume (at the stage that was running).
# Outputs: $OUTPUT_DIR/{config.yaml,state.json,summary.json,budget.json,best,iter-0/,iter-1/,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${OUTPUT_DIR:?set OUTPUT_DIR (one iter-k directory per iteration)}"
: "${CONFIG:=configs/undo.yaml}"
: "${INNER:=sft}"                                      # sft | distill
knob_choice INNER sft distill
: "${SRT_DIR:=${CKPT_ROOT:-}}"                         # scripts/sft.sh's CKPT_ROOT
if [[ "$INNER" == sft ]]; then
  : "${TEACHER_MODEL:=${SRT_DIR:+$SRT_DIR/stage2/final}}"
  : "${TEACHER_MODEL:?set TEACHER_MODEL (the rationale teacher) or SRT_DIR (teacher = the SRT model)}"
  : "${STUDENT_MODEL:=}"                               # empty = CONFIG's (configs/undo.yaml: Qwen/Qwen3-4B-Instruct-2507)
else
  : "${STUDENT_MODEL:=${SRT_DIR:+$SRT_DIR/stage2/final}}"
  : "${STUDENT_MODEL:?set STUDENT_MODEL or SRT_DIR (Phase 2 starts from the SRT model)}"
  : "${TEACHER_MODEL:=}"                               # empty = the student (the SRT model)
fi
: "${TRAIN_DATASET:?set TRAIN_DATASET (.jsonl/.json/.parquet file or HF dataset name)}"
: "${VAL_DATASET:?set VAL_DATASET (the error signals; disjoint from TEST_DATASET)}"
: "${TEST_DATASET:=}"                                  # empty = no test evaluation
: "${NUM_GPUS:=$(knob_gpu_count)}"
: "${PYTHON:=$(knob_python)}"
# knob (config key, check): unset = CONFIG's value
KNOBS=(
  "STUDENT_INIT student_init choice:base,previous" "MAX_ITERATIONS max_iterations pos_int" "PATIENCE patience pos_int"
  "MIN_DELTA min_delta float" "VAL_N val_n pos_int" "TEST_N test_n pos_int"
  "TEMPLATE regenerate.overrides.teacher_prompt.template choice:undo,undo_iteration0,self_revision"
  "FIRST_TEMPLATE regenerate.overrides.teacher_prompt.first_template choice:undo,undo_iteration0,self_revision"
  "MAX_ERRORS regenerate.overrides.max_errors int" "ERROR_THRESHOLD regenerate.overrides.error_threshold float"
  "TEACHER_TEMPERATURE regenerate.overrides.sampling.temperature float"
  "TEACHER_MAX_TOKENS regenerate.overrides.sampling.max_tokens pos_int"
  "EVAL_MAX_TOKENS evaluate.overrides.sampling.max_tokens pos_int" "MAX_MODEL_LEN backend.max_model_len pos_int"
  "KV_CACHE_GB backend.kv_cache_gb float" "TP_SIZE backend.tensor_parallel_size pos_int" "SEED backend.seed int"
  "EXTRACTION grading.extraction choice:boxed,boxed_or_last_number" "LR sft.overrides.lr float"
  "EPOCHS sft.overrides.epochs pos_int" "NPROC_PER_NODE nproc_per_node pos_int"
  "REGENERATE_SHARDS regenerate_shards pos_int" "GPUS_PER_SHARD gpus_per_shard int"
)
[[ -f "$CONFIG" ]] || knob_fail CONFIG "does not exist"
knob_int NUM_GPUS
command -v "$PYTHON" >/dev/null || knob_fail PYTHON "not found"
knob_overrides  # args=(key=value ...) for every set knob in KNOBS, each checked

echo "undo.sh: INNER=$INNER preset $CONFIG; set knobs override it:"
knob_print OUTPUT_DIR STUDENT_MODEL TEACHER_MODEL SRT_DIR TRAIN_DATASET VAL_DATASET TEST_DATASET NUM_GPUS PYTHON
for spec in "${KNOBS[@]}"; do read -r name _ <<< "$spec"; [[ -z "${!name-}" ]] || knob_print "$name"; done

export TOKENIZERS_PARALLELISM=false
if (( NUM_GPUS == 0 )); then
  # vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile; one SFT rank may use both cores
  # (torchrun would default it to one OpenMP thread).
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" KMP_BLOCKTIME="${KMP_BLOCKTIME:-0}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
fi
args+=(inner="$INNER" train_data.path="$TRAIN_DATASET" val_data.path="$VAL_DATASET" output_dir="$OUTPUT_DIR"
  python="$PYTHON")
[[ -n "$STUDENT_MODEL" ]] && args+=(student.path="$STUDENT_MODEL")
[[ -n "$TEACHER_MODEL" ]] && args+=(teacher.path="$TEACHER_MODEL")
[[ -n "$TEST_DATASET" ]] && args+=(test_data.path="$TEST_DATASET")
# the loop and every stage it starts stop with this script (Ctrl-C, kill, kill -9)
knob_spawn "$PYTHON" -m self_distillation.undo --config "$CONFIG" "${args[@]}" "$@"
knob_wait "$KNOB_PID"
