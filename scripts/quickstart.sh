#!/usr/bin/env bash
# The whole SD-Zero pipeline, end to end, on a real small model and a CPU (no GPU, no hub download):
#   base evaluation -> Phase 1 collection -> prepare_data -> SFT stage 1 + 2 (the SRT model)
#   -> Phase 2 self-distillation -> evaluation of the SRT and SD-Zero models on the same held-out problems
#   -> one table + a PNG of Phase 2's curves.
#
#   bash scripts/quickstart.sh                                       # SmolLM2-135M-Instruct (default)
#   QUICKSTART_MODEL=qwen2.5-coder-0.5b bash scripts/quickstart.sh    # stronger, about 3x slower
#   QUICKSTART_SIZE=smoke bash scripts/quickstart.sh                 # tiny sizes (CI's smoke test)
#
# It uses the same drivers and knobs as a GPU run (run_srt_data.sh, sft.sh, distill.sh, eval.sh), only with
# small sizes. Re-running resumes: finished stages are skipped, collection and distillation continue.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${QUICKSTART_DIR:=outputs/quickstart}"
: "${QUICKSTART_MODEL:=smollm2-135m}"        # smollm2-135m | qwen2.5-coder-0.5b
: "${QUICKSTART_SIZE:=full}"                 # full | smoke
: "${MODEL_CACHE:=outputs/embedded_models}"  # converted models, shared by runs
: "${SEED:=0}"

start=$(date +%s)
[[ -x "${VENV_DIR:-.venv}/bin/python" ]] || bash scripts/setup.sh
source scripts/knobs.sh
PY=$(knob_python)
"$PY" -c "import gguf, reasoning_gym, matplotlib" 2>/dev/null || "$PY" -m pip install -q gguf reasoning-gym matplotlib
knob_choice QUICKSTART_MODEL smollm2-135m qwen2.5-coder-0.5b
knob_choice QUICKSTART_SIZE full smoke
knob_int SEED

# Task and grader per model (measured; README "Quickstart"): SmolLM2 rarely writes \boxed{}, so its run
# grades the last number (the lenient, opt-in extraction); Qwen2.5-Coder boxes its answers (strict).
if [[ "$QUICKSTART_MODEL" == smollm2-135m ]]; then
  TASK_KWARGS='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"], "allow_parentheses": false, "allow_negation": false}'
  EXTRACTION=boxed_or_last_number
else
  TASK_KWARGS='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}'
  EXTRACTION=boxed
fi
if [[ "$QUICKSTART_SIZE" == full ]]; then
  N_TRAIN=96 N_TEST=48 EVAL_N=4 MAX_TOKENS=192 STAGE2_SIZE=12 EPOCHS=2 DISTILL_STEPS=4 PROMPTS=8
else
  N_TRAIN=40 N_TEST=8 EVAL_N=2 MAX_TOKENS=96 STAGE2_SIZE=2 EPOCHS=1 DISTILL_STEPS=2 PROMPTS=4
fi
D=$QUICKSTART_DIR
echo "quickstart: model=$QUICKSTART_MODEL size=$QUICKSTART_SIZE dir=$D extraction=$EXTRACTION"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false NUM_GPUS=0
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 TORCH_COMPILE_DISABLE=1
stage() { echo; echo "=== quickstart [$(( $(date +%s) - start ))s] $*"; }

stage "embedded model and task"
MODEL=$("$PY" -m self_revision_training.embedded model "$QUICKSTART_MODEL" "$MODEL_CACHE" | tail -1)
[[ -f "$D/task/task.json" ]] || "$PY" -m self_revision_training.embedded task basic_arithmetic "$D/task" \
  --train "$N_TRAIN" --test "$N_TEST" --seed "$SEED" --kwargs "$TASK_KWARGS"

evaluate() {  # label model_dir
  stage "evaluate $1"
  MODEL_PATH=$2 DATASET="$D/task/test.jsonl" SPLIT=train OUTPUT_DIR="$D/eval/$1" LABEL=$1 N=$EVAL_N \
    KS="1,$EVAL_N" MAX_TOKENS=$MAX_TOKENS MAX_MODEL_LEN=1024 EXTRACTION=$EXTRACTION SEED=$SEED \
    EXTRA_ARGS="model.dtype=float32 backend.kv_cache_gb=1 reuse=true" bash scripts/eval.sh
}
evaluate base "$MODEL"

stage "Phase 1: self-revision collection + prepare_data"
OUTPUT_DIR="$D/srt_data" MODEL_PATH="$MODEL" DATASET="$D/task/train.jsonl" TARGET_REVISION_SAMPLES=0 \
  STAGE2_SIZE=$STAGE2_SIZE NUM_RESPONSES=2 NUM_REVISIONS=2 BATCH_SIZE=32 TEMPERATURE=1.0 TOP_P=0.9 \
  MAX_TOKENS=$MAX_TOKENS MAX_MODEL_LEN=1024 KV_CACHE_GB=1 REVISE_CORRECT=1 EXTRACTION=$EXTRACTION SEED=$SEED \
  EXTRA_ARGS="model.dtype=float32" bash scripts/run_srt_data.sh

stage "SFT stage 1 + 2 (the SRT model)"
# one rank on CPU: let it use both cores (torchrun would default it to one OpenMP thread)
OMP_NUM_THREADS=2 TRAIN_DATA_DIR="$D/srt_data/train_data" CKPT_ROOT="$D/srt" BASE_MODEL="$MODEL" NPROC_PER_NODE=1 \
  CONFIG_STAGE1=configs/quickstart/sft.yaml CONFIG_STAGE2=configs/quickstart/sft.yaml LR_STAGE1=1e-5 \
  LR_STAGE2=1e-5 EPOCHS_STAGE1=$EPOCHS EPOCHS_STAGE2=$EPOCHS MAX_LENGTH=1024 MICRO_BATCH_SIZE=4 SAVE_EVERY=10 \
  bash scripts/sft.sh

stage "Phase 2: on-policy self-distillation"
OUTPUT_DIR="$D/distill" SRT_DIR="$D/srt" TRAIN_DATASET="$D/task/train.jsonl" CONFIG=configs/quickstart/distill.yaml \
  MAX_TOTAL_SEQUENCE_LENGTH=512 MAX_TEACHER_TOKENS=1024 NUM_PROMPTS_PER_STEP=$PROMPTS NUM_GENERATIONS_PER_PROMPT=1 \
  MICRO_BATCH_SIZE=4 MAX_NUM_STEPS=$DISTILL_STEPS LR=1e-5 VAL_PERIOD=0 SAVE_PERIOD=2 NUM_LEARNERS=1 \
  bash scripts/distill.sh "grading.extraction=$EXTRACTION" "seed=$SEED"

evaluate srt "$D/srt/stage2/final"
evaluate sd-zero "$D/distill/final"

stage "report"
"$PY" -m self_distillation.report "$D/eval/base" "$D/eval/srt" "$D/eval/sd-zero" \
  --plot "$D/distill/metrics.jsonl" "$D/phase2_curves.png" \
  --plot-localization "$D/distill/metrics.jsonl" "$D/localization_curves.png" | tee "$D/results.txt"
page=$(ls -1 "$D"/distill/dumps/step_*.html | tail -n 1)
echo "quickstart: done in $(( $(date +%s) - start ))s; table $D/results.txt, plots $D/phase2_curves.png" \
  "$D/localization_curves.png; where the teacher corrects, token by token: $page"
