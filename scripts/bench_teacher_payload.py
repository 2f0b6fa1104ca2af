"""What the teacher sends per target token, and the step time, full-vocabulary vs top-k (not a test).

    PYTHONPATH=. python scripts/bench_teacher_payload.py                       # CPU, a Qwen-vocabulary model
    PYTHONPATH=. python scripts/bench_teacher_payload.py --device cuda --preset qwen3-0.6b --seq-len 4096

Builds random-weight teacher and student models of one shape (no download), scores the same sequences
with the real `teacher.Teacher` in both modes (top-k: ids + log-probs; full vocabulary: hidden states at
the target positions) and runs the real learner path (`objectives.DistillationObjective` through
`training.run_optimizer_step`) on them. Bytes are the pickled size of the teacher's output (what crosses
Ray), per target token; the full-vocabulary log-probs the old path sent are V x 4 bytes per token.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_sft import PRESETS  # noqa: E402
from self_distillation.losses import Divergence  # noqa: E402
from self_distillation.objectives import DistillationObjective  # noqa: E402
from self_distillation.rollout_data import LearnerSample  # noqa: E402
from self_distillation.teacher import Teacher  # noqa: E402
from self_revision_training.shared import distributed as dist_utils  # noqa: E402
from self_revision_training.shared.config import ModelConfig  # noqa: E402
from self_revision_training.shared.target_logits import TargetLogitsLM  # noqa: E402
from self_revision_training.shared.training import MicroBatch, run_optimizer_step  # noqa: E402

PRESETS = {
    **PRESETS,
    "qwen-vocab-small": {  # Qwen's vocabulary on a small body: the payload depends on V and H only
        **PRESETS["tiny"],
        "vocab_size": 151936,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
}


def measure(args, model_dir: str, dtype: str, device: torch.device, config, seqs, top_k: int | None) -> dict:
    """Teacher scoring and one learner step on `seqs` with the teacher's top-k (int) or full vocabulary."""
    from transformers import AutoModelForCausalLM

    div = Divergence("reverse", top_k=top_k)
    teacher = Teacher(ModelConfig(path=model_dir, dtype=dtype), div, device=args.device)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model = TargetLogitsLM(student, args.chunk_size)
    dist_utils.wrap_fsdp(model, device, mixed_precision=args.device == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    objective = DistillationObjective(div, config.vocab_size)
    if top_k is None:
        objective.set_teacher_lm_head(teacher.lm_head_weight().to(device))
    score_s, learn_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores = teacher.score(seqs)
        score_s.append(time.perf_counter() - t0)
        samples = [LearnerSample(i, m, True, None, s) for (i, m), s in zip(seqs, scores, strict=True)]
        t0 = time.perf_counter()
        run_optimizer_step(
            model,
            optimizer,
            [MicroBatch([s]) for s in samples],
            forward=lambda batch: objective.micro_batch_loss(model, batch, 0, device),
            count=lambda batch: [float(sum(s.num_targets for s in batch))],
            max_grad_norm=1.0,
            device=device,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        learn_s.append(time.perf_counter() - t0)
    targets = sum(sum(m) for _, m in seqs)
    return {
        "bytes_per_target_token": len(pickle.dumps(scores)) / targets,
        "teacher_seconds": min(score_s),
        "learner_step_seconds": min(learn_s),
        "peak_memory_gib": dist_utils.peak_memory_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen-vocab-small")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=None, help="target tokens per sequence (7/8)")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, Qwen3Config

    device = dist_utils.init()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    response_len = args.response_len or args.seq_len * 7 // 8
    config = Qwen3Config(**PRESETS[args.preset])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    seqs = [
        (
            torch.randint(0, config.vocab_size, (args.seq_len,), generator=gen).tolist(),
            [0] * (args.seq_len - response_len) + [1] * response_len,
        )
        for _ in range(args.sequences)
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).save_pretrained(tmp)
        for mode, top_k in ((f"top_{args.top_k}", args.top_k), ("full_vocabulary", None)):
            results[mode] = measure(args, tmp, dtype, device, config, seqs, top_k)
    results["old_full_vocabulary_logprobs_bytes_per_target_token"] = config.vocab_size * 4
    print(
        json.dumps(
            {
                "bench": "teacher_payload",
                "device": args.device,
                "preset": args.preset,
                "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size,
                "dtype": dtype,
                "seq_len": args.seq_len,
                "response_len": response_len,
                "sequences": args.sequences,
                "top_k": args.top_k,
                **results,
            }
        )
    )
    dist_utils.cleanup()


if __name__ == "__main__":
    main()
