"""Training throughput of the SFT step (tokens/s and MFU), using `self_revision_training.sft.train_step`.

Not a test. Builds a random-weight Qwen3 model from a config (no download), wraps it exactly as
`sft.py` does (CompletionLossModel + FSDP2 + AdamW) and times full optimizer steps on random tokens.

    PYTHONPATH=. python scripts/bench_sft.py                                   # tiny model, CPU
    PYTHONPATH=. python scripts/bench_sft.py --device cuda --preset qwen3-0.6b --seq-len 4096 \
        --micro-batch 1 --activation-checkpointing --out bench_sft_gpu.json   # one GPU, bf16 compute
    PYTHONPATH=. python scripts/bench_sft.py --preset small --min-len 64 --seq-len 512 --micro-batch 4 \
        [--packing]                                 # mixed lengths, padded vs packed micro-batches (CPU)

With `--min-len`, sequence lengths are uniform in [min-len, seq-len] (mixed, as real data); `--packing` packs
each micro-batch into one row without padding (`sft.collate(..., packing=True)`). Tokens/s counts real
tokens only. Peak memory: CUDA's allocator peak, or on CPU the process's peak RSS (run padded and packed
in separate processes to compare). MFU is reported on a GPU only.

MFU = flops_per_token x tokens/s / peak, with flops_per_token = 6 N + 12 L H Q T (N = non-embedding
parameters plus the lm_head matmul, L layers, H query heads, Q head dim, T sequence length (mean length
with mixed lengths); PaLM appendix B). Activation-checkpoint recomputation is not counted (model FLOPs, not hardware FLOPs).
Peak default: H100 SXM dense bf16, 989e12. Needs only torch, transformers, safetensors, pyyaml.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from self_revision_training.sft import SFTConfig, SFTDataConfig, build_optimizer, collate, train_step  # noqa: E402
from self_revision_training.sft_data import IGNORE_INDEX, SFTExample  # noqa: E402
from self_revision_training.sft_loss import CompletionLossModel  # noqa: E402
from self_revision_training.shared import distributed as dist_utils  # noqa: E402
from self_revision_training.shared.config import ModelConfig  # noqa: E402
from self_revision_training.shared.target_logits import check_packed_attention, use_packed_attention  # noqa: E402

PRESETS = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    ),
    "small": dict(  # a CPU-sized shape for the padded-vs-packed comparison
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "qwen3-0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
}


def flops_per_token(config, seq_len: int) -> tuple[float, int]:
    """6 N + 12 L H Q T with N = non-embedding params + lm_head (counted even when tied)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = config.vocab_size * config.hidden_size
    n = total - embed + (embed if config.tie_word_embeddings else 0)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * n + attention, n


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(GiB, what was measured): CUDA's allocator peak, or on CPU this process's peak resident set."""
    if device.type == "cuda":
        return dist_utils.peak_memory_gib(device), "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_process_peak_rss"


def mixed_lengths(args, generator: torch.Generator, count: int) -> list[int]:
    """`count` sequence lengths: all --seq-len, or uniform in [--min-len, --seq-len]."""
    if not args.min_len:
        return [args.seq_len] * count
    return torch.randint(args.min_len, args.seq_len + 1, (count,), generator=generator).tolist()


def throughput_fields(args, times, tokens_per_s, world, fpt, n_params, device) -> dict:
    """The timing / MFU part of a benchmark's JSON line (shared by bench_distill_learner.py)."""
    memory, memory_kind = peak_memory(device)
    return {
        "steps": args.steps,
        "step_seconds_mean": statistics.mean(times),
        "step_seconds_min": min(times),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / world,
        "flops_per_token": fpt,
        "non_embedding_params_plus_lm_head": n_params,
        "mfu": fpt * tokens_per_s / (args.peak_flops * world) if device.type == "cuda" else None,
        "peak_flops": args.peak_flops,
        "peak_memory_gib": memory,
        "peak_memory_kind": memory_kind,
        "packing": getattr(args, "packing", False),
        "compile_backend": getattr(args, "compile_backend", ""),
        "fused_adamw": getattr(args, "fused_adamw", False),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (tiny 512, else 4096)")
    parser.add_argument("--min-len", type=int, default=0, help="> 0: lengths uniform in [min-len, seq-len]")
    parser.add_argument("--packing", action="store_true", help="one packed row per micro-batch, no padding")
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0 = torch's default)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per forward")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--prompt-fraction", type=float, default=0.1, help="masked prompt share of each sequence"
    )
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile-backend", default="", help="torch.compile each decoder layer (inductor)")
    parser.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW kernel")
    parser.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument(
        "--peak-flops", type=float, default=989e12, help="per-device peak (H100 SXM bf16 dense)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("a GPU is visible; run with --device cuda (or CUDA_VISIBLE_DEVICES= for CPU)")

    from transformers import AutoModelForCausalLM, Qwen3Config

    seq_len = args.seq_len = args.seq_len or (512 if args.preset in ("tiny", "small") else 4096)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist_utils.init()
    world = dist_utils.world_size()
    torch.manual_seed(0)
    config = Qwen3Config(**PRESETS[args.preset])
    causal_lm = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=args.attn_implementation
    )
    causal_lm.config.use_cache = False
    if args.packing:  # as sft.build_model: per-sequence attention, checked before sharding
        use_packed_attention(causal_lm)
        check_packed_attention(causal_lm)
    mixed = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and device.type == "cuda")
    model = CompletionLossModel(causal_lm)
    dist_utils.wrap_fsdp(
        model,
        device,
        mixed_precision=mixed,
        activation_checkpointing=args.activation_checkpointing,
        compile_backend=args.compile_backend,
    )
    model.train()
    # optimizer settings: the SFT defaults (AdamW, betas (0.9, 0.95), wd 1e-4, clip 1.0)
    cfg = SFTConfig(
        output_dir="unused",
        model=ModelConfig(path="random"),
        data=SFTDataConfig(train_file="random"),
        adam_fused=args.fused_adamw,
    )
    optimizer = build_optimizer(model, cfg)

    generator = torch.Generator().manual_seed(dist_utils.rank())

    def micro_batches():
        out = []
        for _ in range(args.grad_accum):
            examples = []
            for n in mixed_lengths(args, generator, args.micro_batch):
                row = torch.randint(0, config.vocab_size, (n,), generator=generator).tolist()
                n_prompt = max(1, int(n * args.prompt_fraction))
                examples.append(SFTExample(row, [IGNORE_INDEX] * n_prompt + row[n_prompt:], "random"))
            out.append((collate(examples, 0, device, args.packing), 1.0))
        return out

    times, tokens = [], []
    for step in range(args.warmup_steps + args.steps):
        batches = micro_batches()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = train_step(model, optimizer, batches, cfg.max_grad_norm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - t0)
            tokens.append(stats["num_tokens"])
    tokens_per_s = sum(tokens) / sum(times)
    mean_len = seq_len if not args.min_len else (args.min_len + seq_len) / 2
    fpt, n_params = flops_per_token(config, mean_len)
    result = {
        "bench": "sft_train_step",
        "device": device.type,
        "preset": args.preset,
        "world_size": world,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "seq_len": seq_len,
        "min_len": args.min_len or seq_len,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "activation_checkpointing": args.activation_checkpointing,
        "mixed_precision_bf16": mixed,
        "attn_implementation": args.attn_implementation,
        **throughput_fields(args, times, tokens_per_s, world, fpt, n_params, device),
        "last_loss": stats["loss"],
    }
    if dist_utils.is_main():
        line = json.dumps(result)
        print(line, flush=True)
        if args.out is not None:
            args.out.write_text(line + "\n")
    dist_utils.cleanup()


if __name__ == "__main__":
    main()
