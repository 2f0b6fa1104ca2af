"""Teacher scoring throughput, padded micro-batches vs packed rows (`teacher.Teacher`, not a test).

    PYTHONPATH=. python scripts/bench_teacher.py                    # the embedded SmolLM2-135M, CPU
    PYTHONPATH=. python scripts/bench_teacher.py --model PATH --device cuda --dtype bfloat16 --budgets 8192 16384

Builds teacher sequences of mixed lengths like a real step (default 64, lengths uniform in 100..600 tokens,
targets = the last 40%: the second copy of y), scores them with the real `Teacher` padded (teacher_pack_tokens
0: micro-batches of 4 in input order, the old path) and packed at each budget, the configurations interleaved
`--repeats` times (best and median time reported: the machine may be shared), and reports how far every
packed run is from the padded run (log-probs, top-k ids; a differing id list is a swap of near-tied entries). Tokens/s counts every token of every sequence.
The embedded model: `python -m self_revision_training.embedded model smollm2-135m outputs/embedded_models`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from self_distillation.losses import Divergence  # noqa: E402
from self_distillation.teacher import Teacher  # noqa: E402
from self_revision_training.shared.config import ModelConfig  # noqa: E402

EMBEDDED = "outputs/embedded_models/smollm2-135m"


def build_sequences(
    num: int, low: int, high: int, vocab: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = rng.randint(low, high)
        prefix = n - max(1, int(0.4 * n))
        out.append(([rng.randrange(3, vocab) for _ in range(n)], [0] * prefix + [1] * (n - prefix)))
    return out


def max_difference(a: list[dict], b: list[dict]) -> dict:
    """How two scorings differ: max |log-prob| difference (rank by rank; full vocabulary: the hidden rows),
    target tokens whose top-k id lists differ, and for those the largest gap between neighbouring log-probs
    at the first differing rank (a swap of near-tied entries has a gap of the size of the rounding)."""
    diff, mismatched, tie_gap = 0.0, 0, 0.0
    for x, y in zip(a, b, strict=True):
        key = "hidden" if x["ids"] is None else "logprobs"
        diff = max(diff, float((x[key] - y[key]).abs().max()))
        diff = max(diff, float((x["target_logprobs"] - y["target_logprobs"]).abs().max()))
        if x["ids"] is None:
            continue
        for row in (x["ids"] != y["ids"]).any(-1).nonzero().flatten().tolist():
            mismatched += 1
            j = int((x["ids"][row] != y["ids"][row]).nonzero()[0])
            values = x["logprobs"][row]
            gaps = [abs(float(values[i] - values[i + 1])) for i in (j - 1, j) if 0 <= i < len(values) - 1]
            tie_gap = max(tie_gap, min(gaps, default=0.0))
    return {"max_abs_diff_vs_padded": diff, "id_mismatch_tokens": mismatched, "max_tie_gap": tie_gap}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-sequences", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=600)
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[1024, 2048, 4096], help="teacher_pack_tokens"
    )
    parser.add_argument("--top-k", type=int, default=64, help="0 = full vocabulary (hidden states)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        raise SystemExit(
            f"{args.model} not found (python -m self_revision_training.embedded model smollm2-135m outputs/embedded_models)"
        )
    torch.set_num_threads(args.threads)
    div = Divergence("mixed", top_k=args.top_k or None)
    model = ModelConfig(path=args.model, dtype=args.dtype)
    configs = {"padded": Teacher(model, div, device=args.device)}
    for budget in args.budgets:
        configs[f"packed_{budget}"] = Teacher(model, div, device=args.device, pack_tokens=budget)
    vocab = configs["padded"].model.config.vocab_size
    seqs = build_sequences(args.num_sequences, args.min_len, args.max_len, vocab, args.seed)
    tokens = sum(len(ids) for ids, _ in seqs)
    configs["padded"].score(seqs[:2])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, teacher in configs.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs[name] = teacher.score(seqs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            print(f"[bench_teacher] {name}: {times[name][-1]:.2f}s", flush=True)
    base = min(times["padded"])
    result = {
        "bench": "teacher_scoring",
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "num_sequences": args.num_sequences,
        "lengths": [args.min_len, args.max_len],
        "tokens": tokens,
        "target_tokens": sum(sum(m) for _, m in seqs),
        "payload": "top_k" if args.top_k else "full_vocabulary",
        "top_k": args.top_k or None,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "configs": {},
    }
    for name, values in times.items():
        result["configs"][name] = {
            "seconds_min": min(values),
            "seconds_median": statistics.median(values),
            "tokens_per_s": tokens / min(values),
            "speedup_vs_padded": base / min(values),
            **max_difference(outputs["padded"], outputs[name]),
        }
    line = json.dumps(result)
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
