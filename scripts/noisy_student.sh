#!/usr/bin/env bash
# Noisy-Student iterations with SD-Zero: label -> train -> relabel with the newly trained model.
#
#   OUTPUT_DIR=outputs/ns BASE_MODEL=Qwen/Qwen3-4B-Instruct-2507 UNLABELLED=data/unlabelled.jsonl \
#     LABELLED=data/gold_1k.jsonl AUDIT=data/audit.jsonl EVAL_DATASET=HuggingFaceH4/MATH-500 \
#     ITERATIONS=3 bash scripts/noisy_student.sh
#   DRY_RUN=1 OUTPUT_DIR=/tmp/ns UNLABELLED=u.jsonl bash scripts/noisy_student.sh    # print the commands only
#
# Iteration i (directory $OUTPUT_DIR/iter-i):
#   1. labels/  scripts/pseudo_label.sh on UNLABELLED with the labeller: START_LABELLER (default BASE_MODEL)
#               for i=1, else iter-(i-1)/model, the previous iteration's exported final/ (a frozen snapshot:
#               written once, never the moving student). audit/ does the same on AUDIT (gold hidden from
#               the vote, scored in stats.json; never trained on).
#   2. train.jsonl  NUM_PSEUDO pseudo-labelled rows (empty = all kept labels) + NUM_LABELLED rows of LABELLED
#               (empty = all; no LABELLED = pseudo only), seeded sample, shuffled (training_mix.build_training_mix).
#   3. SD-Zero on train.jsonl from the student (STUDENT_INIT=base: BASE_MODEL every iteration, the Noisy-Student
#      default; previous: the labeller): run_srt_data.sh -> sft.sh -> distill.sh with reward TRAIN_REWARD
#      (ground_truth reads the label as the answer; majority_vote also logs audits where gold_answer exists).
#   4. eval/    scripts/eval.sh on EVAL_DATASET (when set); iter-i/model -> distill/final.
# Re-running resumes: every sub-driver resumes itself and finished stages are skipped. Every other knob of
# pseudo_label.sh (LABEL_* here), run_srt_data.sh, sft.sh, distill.sh and eval.sh passes through the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${OUTPUT_DIR:?set OUTPUT_DIR (one iter-i directory per iteration)}"
: "${UNLABELLED:?set UNLABELLED (problems to pseudo-label; answers, if any, are hidden from the vote)}"
: "${BASE_MODEL:=Qwen/Qwen3-4B-Instruct-2507}"
: "${START_LABELLER:=$BASE_MODEL}"                 # labeller of iteration 1
: "${LABELLED:=}"                                   # gold-labelled problems to mix in; empty = none
: "${AUDIT:=}"                                      # gold audit set, labelled every iteration, never trained on
: "${EVAL_DATASET:=}"                               # held-out evaluation; empty = none
: "${EVAL_SPLIT:=test}"
: "${ITERATIONS:=2}"
: "${STUDENT_INIT:=base}"                           # base | previous
: "${NUM_PSEUDO:=}"                                 # pseudo-labelled rows per iteration; empty = all
: "${NUM_LABELLED:=}"                               # gold rows per iteration; empty = all of LABELLED
: "${TRAIN_REWARD:=ground_truth}"                   # ground_truth | majority_vote
: "${LABEL_NUM_VOTES:=8}" "${LABEL_THRESHOLD:=0.5}" "${LABEL_TEMPERATURE:=1.0}" "${LABEL_TOP_P:=1.0}"
: "${LABEL_MAX_TOKENS:=4096}"
: "${EXTRACTION:=boxed}"                            # boxed | boxed_or_last_number, for every stage
: "${SEED:=0}"
: "${DRY_RUN:=0}"                                   # 1 = print the commands, run nothing
: "${PYTHON:=$(knob_python)}"

knob_pos_int ITERATIONS; knob_pos_int LABEL_NUM_VOTES; knob_int SEED
knob_opt_int NUM_PSEUDO; knob_opt_int NUM_LABELLED
for k in LABEL_THRESHOLD LABEL_TEMPERATURE LABEL_TOP_P; do knob_float "$k"; done
knob_pos_int LABEL_MAX_TOKENS
knob_choice STUDENT_INIT base previous
knob_choice TRAIN_REWARD ground_truth majority_vote
knob_choice EXTRACTION boxed boxed_or_last_number
knob_choice DRY_RUN 0 1

echo "noisy_student.sh: settings"
knob_print OUTPUT_DIR UNLABELLED BASE_MODEL START_LABELLER LABELLED AUDIT EVAL_DATASET EVAL_SPLIT ITERATIONS \
  STUDENT_INIT NUM_PSEUDO NUM_LABELLED TRAIN_REWARD LABEL_NUM_VOTES LABEL_THRESHOLD LABEL_TEMPERATURE LABEL_TOP_P \
  LABEL_MAX_TOKENS EXTRACTION SEED DRY_RUN PYTHON

run() {  # print a command, then run it unless DRY_RUN=1
  echo "+ $*"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

label() {  # model dataset out
  run env MODEL_PATH="$1" DATASET="$2" OUTPUT_DIR="$3" NUM_VOTES="$LABEL_NUM_VOTES" THRESHOLD="$LABEL_THRESHOLD" \
    TEMPERATURE="$LABEL_TEMPERATURE" TOP_P="$LABEL_TOP_P" MAX_TOKENS="$LABEL_MAX_TOKENS" EXTRACTION="$EXTRACTION" \
    SEED="$SEED" bash scripts/pseudo_label.sh
}

labeller=$START_LABELLER
for (( i = 1; i <= ITERATIONS; i++ )); do
  dir="$OUTPUT_DIR/iter-$i"
  echo; echo "=== noisy_student.sh: iteration $i of $ITERATIONS (labeller $labeller) -> $dir"
  if [[ "$DRY_RUN" == 0 ]]; then
    mkdir -p "$dir"
    if [[ -f "$dir/labeller.txt" && "$(cat "$dir/labeller.txt")" != "$labeller" ]]; then
      echo "noisy_student.sh: $dir was labelled by $(cat "$dir/labeller.txt"), not $labeller; use a new OUTPUT_DIR" >&2
      exit 2
    fi
    echo "$labeller" > "$dir/labeller.txt"
  fi
  label "$labeller" "$UNLABELLED" "$dir/labels"
  [[ -z "$AUDIT" ]] || label "$labeller" "$AUDIT" "$dir/audit"

  if [[ ! -f "$dir/train.jsonl" ]]; then
    run "$PYTHON" -m self_revision_training.training_mix \
      --labels "$dir/labels/labels.jsonl" --out "$dir/train.jsonl" --labelled "$LABELLED" \
      --num-pseudo "$NUM_PSEUDO" --num-labelled "$NUM_LABELLED" --seed "$SEED"
  fi

  student=$BASE_MODEL; [[ "$STUDENT_INIT" == previous ]] && student=$labeller
  if [[ ! -f "$dir/srt/stage2/final/config.json" ]]; then
    run env OUTPUT_DIR="$dir/srt_data" MODEL_PATH="$student" DATASET="$dir/train.jsonl" SPLIT=train \
      EXTRACTION="$EXTRACTION" SEED="$SEED" EXTRA_ARGS="${SRT_EXTRA_ARGS:-} reward=$TRAIN_REWARD" bash scripts/run_srt_data.sh
    run env TRAIN_DATA_DIR="$dir/srt_data/train_data" CKPT_ROOT="$dir/srt" BASE_MODEL="$student" bash scripts/sft.sh
  fi
  if [[ ! -f "$dir/distill/final/config.json" ]]; then
    run env OUTPUT_DIR="$dir/distill" SRT_DIR="$dir/srt" TRAIN_DATASET="$dir/train.jsonl" \
      bash scripts/distill.sh "grading.extraction=$EXTRACTION" "seed=$SEED" "reward=$TRAIN_REWARD"
  fi
  [[ "$DRY_RUN" == 1 ]] || ln -sfn distill/final "$dir/model"
  if [[ -n "$EVAL_DATASET" ]]; then
    run env MODEL_PATH="$dir/model" DATASET="$EVAL_DATASET" SPLIT="$EVAL_SPLIT" OUTPUT_DIR="$dir/eval" \
      LABEL="iter-$i" EXTRACTION="$EXTRACTION" SEED="$SEED" EXTRA_ARGS="${EVAL_EXTRA_ARGS:-} reuse=true" bash scripts/eval.sh
  fi
  labeller="$dir/model"   # the next labeller: this iteration's exported final/, frozen
done
echo "noisy_student.sh: done; models in $OUTPUT_DIR/iter-*/model, label stats in $OUTPUT_DIR/iter-*/labels/stats.json"
