"""Throughput of the Phase-2 learner step (tokens/s and MFU): forward + backward + AdamW with the
distillation objective (`objectives.DistillationObjective` through `training.run_optimizer_step`, the
learner's own code path) against given teacher top-k log-probs.

Not a test. Random-weight Qwen3 from a config (no download), FSDP2 as in `learner.Learner`.

    PYTHONPATH=. python scripts/bench_distill_learner.py                          # tiny model, CPU
    PYTHONPATH=. python scripts/bench_distill_learner.py --device cuda --preset qwen3-0.6b --seq-len 4096 \
        --response-len 3584 --micro-batch 1 --activation-checkpointing --out bench_distill_gpu.json
    PYTHONPATH=. python scripts/bench_distill_learner.py --preset small --min-len 64 --seq-len 512 \
        --micro-batch 4 [--packing]                 # mixed lengths, padded vs packed micro-batches (CPU)

With `--min-len`, lengths are uniform in [min-len, seq-len] with the last 7/8 of each sequence as targets;
`--packing` is the learner's `packing: true` (one packed row per micro-batch). Tokens/s counts real tokens.
Peak memory and MFU as scripts/bench_sft.py (CPU: process peak RSS, no MFU).

MFU as scripts/bench_sft.py: flops_per_token = 6 N + 12 L H Q T (N = non-embedding params + lm_head),
model FLOPs only. Peak default H100 SXM dense bf16 (989e12). Needs only torch, transformers, safetensors,
pyyaml (no ray / vllm / datasets / math-verify).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_sft import PRESETS, flops_per_token, mixed_lengths, throughput_fields  # noqa: E402
from self_distillation.losses import Divergence  # noqa: E402
from self_distillation.objectives import DistillationObjective  # noqa: E402
from self_distillation.rollout_data import LearnerSample  # noqa: E402
from self_revision_training.shared import distributed as dist_utils  # noqa: E402
from self_revision_training.shared.target_logits import (  # noqa: E402
    TargetLogitsLM,
    check_packed_attention,
    use_packed_attention,
)
from self_revision_training.shared.training import MicroBatch, run_optimizer_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="prompt + response tokens (tiny 512, else 4096)"
    )
    parser.add_argument(
        "--response-len", type=int, default=None, help="target tokens per sequence (default 7/8)"
    )
    parser.add_argument("--min-len", type=int, default=0, help="> 0: lengths uniform in [min-len, seq-len]")
    parser.add_argument("--packing", action="store_true", help="one packed row per micro-batch, no padding")
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0 = torch's default)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--kl-type", default="mixed", choices=["forward", "reverse", "mixed", "jsd"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile-backend", default="", help="torch.compile each decoder layer (inductor)")
    parser.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW kernel")
    parser.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--peak-flops", type=float, default=989e12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    from transformers import AutoModelForCausalLM, Qwen3Config

    seq_len = args.seq_len = args.seq_len or (512 if args.preset in ("tiny", "small") else 4096)
    response_len = args.response_len or seq_len * 7 // 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist_utils.init()
    world = dist_utils.world_size()
    torch.manual_seed(0)
    config = Qwen3Config(**PRESETS[args.preset])
    causal_lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    causal_lm.config.use_cache = False
    if args.packing:  # as learner.setup: per-sequence attention, checked before sharding
        use_packed_attention(causal_lm)
        check_packed_attention(causal_lm)
    objective = DistillationObjective(
        Divergence(args.kl_type, top_k=args.top_k), config.vocab_size, packing=args.packing
    )
    model = TargetLogitsLM(causal_lm, args.chunk_size)
    mixed = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and device.type == "cuda")
    dist_utils.wrap_fsdp(
        model,
        device,
        mixed_precision=mixed,
        activation_checkpointing=args.activation_checkpointing,
        compile_backend=args.compile_backend,
    )
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=0.01, fused=args.fused_adamw or None
    )
    gen = torch.Generator().manual_seed(dist_utils.rank())

    def sample(length: int) -> LearnerSample:
        ids = torch.randint(0, config.vocab_size, (length,), generator=gen).tolist()
        response_len = args.response_len or length * 7 // 8
        n_prompt = length - response_len
        if args.preset in ("tiny", "small"):
            lps, top = (
                torch.randn(response_len, config.vocab_size, generator=gen)
                .log_softmax(-1)
                .topk(args.top_k, -1)
            )
        else:
            lps = torch.randn(response_len, args.top_k, generator=gen).log_softmax(-1)
            top = torch.randint(0, config.vocab_size, (response_len, args.top_k), generator=gen)
        teacher = {"ids": top.int(), "logprobs": lps, "target_logprobs": torch.zeros(response_len)}
        return LearnerSample(ids, [0] * n_prompt + [1] * response_len, True, None, teacher)

    times, tokens = [], []
    loss = 0.0
    for step in range(args.warmup_steps + args.steps):
        batches = [
            MicroBatch([sample(n) for n in mixed_lengths(args, gen, args.micro_batch)])
            for _ in range(args.grad_accum)
        ]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = run_optimizer_step(
            model,
            optimizer,
            batches,
            forward=lambda samples: objective.micro_batch_loss(model, samples, 0, device),
            count=lambda samples: [float(sum(s.num_targets for s in samples))],
            max_grad_norm=1.0,
            device=device,
        )
        loss = result.loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(s.student_ids) for mb in batches for s in mb.inputs) * world)
    tokens_per_s = sum(tokens) / sum(times)
    fpt, n_params = flops_per_token(config, seq_len if not args.min_len else (args.min_len + seq_len) / 2)
    result = {
        "bench": "distill_learner_step",
        "device": device.type,
        "preset": args.preset,
        "world_size": world,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "seq_len": seq_len,
        "min_len": args.min_len or seq_len,
        "response_len": response_len if not args.min_len else "7/8 of each",
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "top_k": args.top_k,
        "kl_type": args.kl_type,
        "activation_checkpointing": args.activation_checkpointing,
        "mixed_precision_bf16": mixed,
        **throughput_fields(args, times, tokens_per_s, world, fpt, n_params, device),
        "last_kl_mean": loss,
    }
    if dist_utils.is_main():
        print(json.dumps(result), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(result) + "\n")
    dist_utils.cleanup()


if __name__ == "__main__":
    main()
