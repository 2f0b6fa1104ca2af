"""Learner -> rollout engine weight sync: time per sync and bytes written, file vs memory (not a test).

    PYTHONPATH=. python scripts/bench_weight_sync.py                          # embedded SmolLM2-135M, HF engine
    PYTHONPATH=. python scripts/bench_weight_sync.py --engine vllm --ray      # vLLM CPU engine in a Ray actor

The real `learner.Learner` (1 FSDP2 rank, fp32 master weights) and the real `actors.RolloutWorker`, the syncs
`train.sync_rollout` runs: file = rank 0 gathers and writes weights/step_N/model.safetensors, the engine reloads
it; memory = rank 0 gathers and hands the tensors over (`--ray`: `ray.put` once, the engine actor reads the
ref from the shared-memory object store; without Ray: a direct call). The modes alternate `--repeats` times
(best and median reported: the machine may be shared). Bytes written = the size of the weights directory the
step leaves (memory: nothing is written). vLLM in the driver process shares torch.distributed with the
learner, so `--engine vllm` needs `--ray`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from self_distillation.actors import ActorHandle, RolloutWorker  # noqa: E402
from self_distillation.config import SelfDistillationConfig  # noqa: E402
from self_distillation.learner import Learner  # noqa: E402
from self_revision_training.shared.config import BackendConfig, DatasetConfig, ModelConfig  # noqa: E402

EMBEDDED = "outputs/embedded_models/smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--ray", action="store_true", help="the engine as a Ray actor (object store path)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.engine == "vllm" and not args.ray:
        raise SystemExit("--engine vllm needs --ray (the engine in its own process)")
    torch.set_num_threads(args.threads)
    model = ModelConfig(path=args.model, dtype="float32")
    cfg = SelfDistillationConfig(
        student=model,
        teacher=model,
        train_data=DatasetConfig(path="unused"),
        output_dir="unused",
        mixed_precision="fp32",
        activation_checkpointing=False,
        health_metrics=False,
    )
    learner = Learner(cfg, 0, 1)
    learner.setup(*learner.address())
    backend = BackendConfig(name=args.engine, max_model_len=1024, kv_cache_gb=0.5)
    if args.ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False)
    engine = ActorHandle("rollout", RolloutWorker, (model, backend), remote=args.ray, options={"num_cpus": 0})
    root = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    times: dict[str, list[float]] = {"file": [], "memory": []}
    written: dict[str, int] = {}
    try:
        for step in range(args.repeats):
            for mode in ("file", "memory"):
                t0 = time.perf_counter()
                if mode == "file":
                    weights = str(root / f"step_{step:06d}")
                    learner.save_weights(weights)
                else:
                    weights = learner.export_weights(args.ray)
                    weights = weights[0] if args.ray else weights
                engine.call("update_weights", weights)
                times[mode].append(time.perf_counter() - t0)
                written[mode] = (
                    sum(p.stat().st_size for p in Path(weights).rglob("*")) if mode == "file" else 0
                )
                shutil.rmtree(root / f"step_{step:06d}", ignore_errors=True)
                del weights
                print(f"[bench_weight_sync] {mode}: {times[mode][-1]:.3f}s", flush=True)
    finally:
        engine.kill()
        learner.close()
        shutil.rmtree(root, ignore_errors=True)
    params = sum(v.numel() for v in learner.model.state_dict().values())
    result = {
        "bench": "weight_sync",
        "model": args.model,
        "engine": args.engine,
        "ray": args.ray,
        "threads": args.threads,
        "parameters": params,
        "repeats": args.repeats,
        "modes": {
            mode: {
                "seconds_min": min(v),
                "seconds_median": statistics.median(v),
                "bytes_written_per_sync": written[mode],
            }
            for mode, v in times.items()
        },
    }
    result["memory_speedup"] = min(times["file"]) / min(times["memory"])
    line = json.dumps(result)
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
