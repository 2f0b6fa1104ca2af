"""Grader throughput: verifications per second with hard timeouts in force (not a test).

    .venv/bin/python scripts/bench_grader.py --num 2000 --workers 2 --json

Builds `num` DISTINCT response/answer pairs (no cache hits: integers, fractions, decimals, GSM8K-style
answers, LaTeX expressions, intervals, a share of wrong and unboxed answers) and grades them through
MathGrader (worker processes, per-item deadline). Reports warm throughput and the accuracy of the
grades against the known labels. Verification is CPU-bound (about 1.3 ms of CPU per item here), so the
1-minute load average is reported too: other processes on the same cores change the result several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.rewards.math_verify import MathGrader


def make_pairs(num: int, seed: int) -> list[tuple[str, str, bool]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(num):
        kind = i % 6
        wrong = rng.random() < 0.3
        a, b = rng.randint(1, 10_000), rng.randint(2, 97)
        if kind == 0:
            gold, pred = str(a), str(a + 1 if wrong else a)
        elif kind == 1:
            gold, pred = f"{a}/{b}", f"\\frac{{{a + (1 if wrong else 0)}}}{{{b}}}"
        elif kind == 2:
            gold, pred = f"The total is {a:,}.\n#### {a:,}", f"{a + (2 if wrong else 0)}"
        elif kind == 3:
            gold, pred = f"{a}.{b}", f"{a}.{b + (1 if wrong else 0)}0"
        elif kind == 4:
            gold, pred = f"{b}x^2+{a}", f"{a}+{b + (1 if wrong else 0)}x^2"
        else:
            gold, pred = f"[{b}, {a})", f"[{b}, {a})" if not wrong else f"({b}, {a}]"
        boxed = rng.random() > 0.05
        response = f"Step 1: compute things for item {i}.\nSo the answer is " + (
            f"$\\boxed{{{pred}}}$." if boxed else f"{pred}."
        )
        pairs.append((response, gold, boxed and not wrong))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pairs = make_pairs(args.num, args.seed)
    cfg = GradingConfig(num_workers=args.workers, timeout_s=args.timeout)
    with MathGrader(cfg) as grader:
        start = time.perf_counter()
        grader.grade_batch(["\\boxed{1}"] * args.workers, ["1"] * args.workers)  # start-up + warm-up
        startup_s = time.perf_counter() - start
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        results = grader.grade_batch([p[0] for p in pairs], [p[1] for p in pairs])
        seconds = time.perf_counter() - start
        respawns = grader.num_respawns
    agree = sum(r.correct == p[2] for r, p in zip(results, pairs, strict=True))
    report = {
        "num": args.num,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "startup_s": round(startup_s, 2),
        "seconds": round(seconds, 2),
        "verifications_per_s": round(args.num / seconds, 1),
        "agreement_with_labels": round(agree / args.num, 4),
        "timeouts": sum(r.reason == "timeout" for r in results),
        "respawns": respawns,
        "load_avg_1m": round(load_before, 2),  # just before the timed run (other processes + this start-up)
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
