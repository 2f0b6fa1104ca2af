"""Collector overhead: the collector's wall time vs the backend's raw generate on the same prompts (not a test).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 TORCH_COMPILE_DISABLE=1 \\
    .venv/bin/python scripts/bench_collect.py --model /path/to/hf_dir --out-dir outputs/bench_collect

1. Runs the collector (collect.main) on `--num-problems` one-digit addition/subtraction problems.
   Its loop time (summary.json `session_seconds`: prompts, generation, grading, JSONL commits and
   summaries) is the collector's time.
2. Starts a fresh engine with the same seed and replays the same calls with nothing else: per batch,
   generate the y_init prompts, then the revision prompts of the same (problem, response) positions the
   collector revised, built from the freshly sampled token ids. With the engine-level seed, vLLM repeats
   the samples of an identical call sequence, so both sides generate the same tokens (the script reports
   whether they did).
Overhead = collector time / raw time - 1. Prints one JSON line (`--json-out FILE` also writes it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from self_revision_training import collect  # noqa: E402
from self_revision_training.shared.config import BackendConfig, ModelConfig, PromptConfig, SamplingConfig  # noqa: E402
from self_revision_training.shared.prompts import build_generation_prompt, build_phrase_block, encode_text  # noqa: E402
from self_revision_training.shared.storage import iter_committed_batches  # noqa: E402


def write_problems(path: Path, num: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        op = rng.choice("+-")
        rows.append({"problem": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--out-dir", required=True, help="fresh directory for the collector's output")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--num-problems", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-responses", type=int, default=2)
    ap.add_argument("--num-revisions", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the benchmark needs a fresh collection")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "problems.jsonl"
    write_problems(data, args.num_problems, args.seed)
    overrides = {
        "model.path": args.model,
        "model.dtype": args.dtype,
        "dataset.path": data,
        "output_dir": out / "collect",
        "backend.name": args.backend,
        "backend.seed": args.seed,
        "backend.max_model_len": args.max_model_len,
        "backend.kv_cache_gb": args.kv_cache_gb,
        "sampling.max_tokens": args.max_tokens,
        "sampling.top_p": 0.9,
        "num_responses": args.num_responses,
        "num_revisions": args.num_revisions,
        "batch_size": args.batch_size,
        "target_revision_samples": 0,
        "truncated_init": "keep",
        "grading.extraction": "boxed_or_last_number",
        "progress": False,
    }
    collect.main([f"{k}={v}" for k, v in overrides.items()])
    shard = out / "collect" / "shard-0-of-1"
    summary = json.loads((shard / "summary.json").read_text())
    batches = list(iter_committed_batches(shard / "attempts.jsonl"))

    # --- raw replay: the same calls, nothing else
    from transformers import AutoTokenizer

    from self_revision_training.shared.generation import create_backend

    tok = AutoTokenizer.from_pretrained(args.model)
    prompt_cfg = PromptConfig()
    problems = {i: json.loads(line)["problem"] for i, line in enumerate(data.read_text().splitlines())}
    blocks = {c: encode_text(tok, build_phrase_block(c, prompt_cfg)) for c in (True, False)}
    backend = create_backend(
        ModelConfig(path=args.model, dtype=args.dtype),
        BackendConfig(
            name=args.backend, seed=args.seed, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb
        ),
    )
    init_sampling = SamplingConfig(top_p=0.9, max_tokens=args.max_tokens, n=args.num_responses)
    rev_sampling = SamplingConfig(top_p=0.9, max_tokens=args.max_tokens, n=args.num_revisions)
    plans = []
    for marker, records in batches:
        prompts = [build_generation_prompt(tok, problems[i], prompt_cfg).ids for i in marker["indices"]]
        revised = [
            (r["original_index"], r["response_idx"], r["y_init_correct"])
            for r in records
            if r["type"] == "init" and r["revised"]
        ]
        plans.append((marker["indices"], prompts, revised))
    raw_tokens = 0
    t0 = time.time()
    for indices, prompts, revised in plans:
        limits = [min(args.max_tokens, args.max_model_len - len(p)) for p in prompts]
        outs = backend.generate(prompts, init_sampling, max_tokens=limits)
        raw_tokens += sum(len(s.token_ids) for row in outs for s in row)
        rev_prompts = []
        for index, k, correct in revised:
            pos = indices.index(index)
            ids = outs[pos][k].token_ids
            ids = ids[:-1] if ids and ids[-1] in backend.eos_token_ids else ids
            rev_prompts.append(prompts[pos] + ids + blocks[correct])
        if rev_prompts:
            rev_limits = [min(args.max_tokens, args.max_model_len - len(p)) for p in rev_prompts]
            rev_outs = backend.generate(rev_prompts, rev_sampling, max_tokens=rev_limits)
            raw_tokens += sum(len(s.token_ids) for row in rev_outs for s in row)
    raw_seconds = time.time() - t0
    backend.close()

    collector_seconds = summary["session_seconds"]
    collector_tokens = summary["throughput"]["generated_tokens"]
    result = {
        "backend": args.backend,
        "model": args.model,
        "problems": args.num_problems,
        "batch_size": args.batch_size,
        "collector_seconds": collector_seconds,
        "raw_generate_seconds": round(raw_seconds, 2),
        "overhead": round(collector_seconds / raw_seconds - 1, 4),
        "collector_tokens": collector_tokens,
        "raw_tokens": raw_tokens,
        "same_tokens": collector_tokens == raw_tokens,
        "collector_tokens_per_s": round(collector_tokens / collector_seconds, 1),
        "raw_tokens_per_s": round(raw_tokens / raw_seconds, 1),
        "overhead_per_token": round(
            (collector_seconds / collector_tokens) / (raw_seconds / raw_tokens) - 1, 4
        ),
        "init_accuracy": summary["init"]["accuracy"],
        "verified_tuples": summary["verified_tuples"],
    }
    line = json.dumps(result)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
