"""Peak memory and time of the naive full-vocabulary distillation loss vs the memory-lean path.

    .venv/bin/python scripts/bench_loss.py --json                 # N=4096, V=151,936, H=1024, CPU
    .venv/bin/python scripts/bench_loss.py --device cuda --json   # on a GPU machine

Both variants do forward + backward from final hidden states: naive = full [N, V] student and teacher
logits then `distillation_loss`; lean = `lean_distillation_loss` (teacher logits only at target
positions, chunks of `--chunk` tokens). Each variant runs in its own process; peak memory is the
process's peak RSS (CPU) or `torch.cuda.max_memory_allocated` (GPU) above what the inputs already use.
Prints one JSON object with both measurements, their ratios, and the max abs differences of the loss
and the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from self_distillation.losses import distillation_loss, lean_distillation_loss  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, v, h = args.n, args.vocab, args.hidden
    student_hidden = torch.randn(n, h, device=device).requires_grad_(True)
    student_weight = (torch.randn(v, h, device=device) * h**-0.5).requires_grad_(True)
    teacher_hidden = torch.randn(n, h, device=device)
    teacher_weight = torch.randn(v, h, device=device) * h**-0.5
    mask = torch.ones(n, device=device)
    options = {"kl_type": args.kl_type, "top_k": args.top_k}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_bytes()
    start = time.perf_counter()
    if args.variant == "naive":
        student_logits = student_hidden @ student_weight.T  # [N, V]
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T  # [N, V]
        loss, _ = distillation_loss(student_logits[None], teacher_logits[None], mask[None], **options)
    else:
        loss, _ = lean_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            mask,
            chunk_size=args.chunk,
            **options,
        )
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    seconds = time.perf_counter() - start
    torch.save(
        {
            "loss": loss.detach().cpu(),
            "grad_hidden": student_hidden.grad.cpu(),
            "grad_weight": student_weight.grad.cpu(),
        },
        args.out,
    )
    return {"peak_mb": round(peak / 2**20, 1), "seconds": round(seconds, 2), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="target tokens")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--kl-type", default="reverse")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", choices=["naive", "lean"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return
    report = {
        "n": args.n,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "kl_type": args.kl_type,
        "top_k": args.top_k,
        "chunk": args.chunk,
        "device": args.device,
        "threads": args.threads,
    }
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "lean"):
            out = Path(tmp) / f"{variant}.pt"
            child = [a for a in sys.argv[1:] if a != "--json"] + ["--variant", variant, "--out", str(out)]
            proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
            if proc.returncode != 0:
                report[variant] = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
                continue
            report[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            tensors[variant] = torch.load(out)
    if len(tensors) == 2:
        naive, lean = tensors["naive"], tensors["lean"]
        report["peak_ratio"] = round(report["lean"]["peak_mb"] / max(report["naive"]["peak_mb"], 1e-9), 4)
        report["time_ratio"] = round(report["lean"]["seconds"] / report["naive"]["seconds"], 3)
        report["loss_rel_diff"] = float((lean["loss"] - naive["loss"]).abs() / naive["loss"].abs())
        report["max_abs_diff_loss"] = float((lean["loss"] - naive["loss"]).abs())
        report["max_abs_diff_grad_hidden"] = float((lean["grad_hidden"] - naive["grad_hidden"]).abs().max())
        report["max_abs_diff_grad_weight"] = float((lean["grad_weight"] - naive["grad_weight"]).abs().max())
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
