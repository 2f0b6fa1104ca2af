"""Self-Revision Training (SRT): one completion-only SFT stage with PyTorch FSDP2 (paper Sec. 3, Phase 1).

    python -m self_revision_training.sft --config configs/phase1_sft_stage1.yaml \
        model.path=Qwen/Qwen3-4B-Instruct-2507 data.train_file=DATA/srt_stage1.jsonl output_dir=RUN/stage1
    torchrun --nproc_per_node 8 -m self_revision_training.sft --config configs/phase1_sft_stage2.yaml \
        model.path=RUN/stage1/final data.train_file=DATA/srt_stage2.jsonl output_dir=RUN/stage2

`scripts/sft.sh` runs Stage 1 then Stage 2. Each step: the global batch (micro_batch_size x grad_accum x
world_size sequences, `sft_data.build_step_batches`) is split over ranks and micro-batches; the loss is
the cross-entropy summed over completion tokens divided by the completion tokens of the whole global
batch (all-reduced before any backward), so it does not depend on the split. FSDP2 averages gradients
over ranks, so each rank back-propagates its sum x world_size / global_count. Then clip, AdamW, LR step.
Outputs in `output_dir`: config.yaml (+ git SHA), metrics.jsonl, checkpoints/step_N (resume: rerun the
same command), and final/ (a consolidated Hugging Face model + tokenizer + sdzero_prompt.json).

One run per output_dir: rank 0 holds its lock (`shared.run_lock`); a second run exits naming the first's
pid. A resume compares this run's config with the checkpoint's: a change outside `RESUME_ALLOWED` (data,
model, loss, schedule, batch, seed, max_length, ...) is an error listing the keys; a changed `lr` is
applied to the optimizer and the scheduler from the resumed step on (`checkpoints.apply_resumed_lr`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from self_revision_training.sft_data import (
    IGNORE_INDEX,
    SFTExample,
    build_sft_examples,
    build_step_batches,
    compute_steps_per_epoch,
    load_records,
)
from self_revision_training.sft_loss import CompletionLossModel
from self_revision_training.shared import checkpoints
from self_revision_training.shared import distributed as dist_utils
from self_revision_training.shared.budget import Budget
from self_revision_training.shared.config import (
    ConfigError,
    ModelConfig,
    PromptConfig,
    load_yaml,
    parse_cli,
    to_dict,
)
from self_revision_training.shared.prompts import (
    PROMPT_SPEC_FILE,
    check_prompt_spec,
    load_prompt_spec,
    save_prompt_spec,
)
from self_revision_training.shared.run_config import check_resume_config, save_run_config
from self_revision_training.shared.run_lock import RunLockError, acquire_run_lock
from self_revision_training.shared.run_log import MetricsLogger
from self_revision_training.shared.target_logits import (
    check_packed_attention,
    packed_position_ids,
    use_packed_attention,
)
from self_revision_training.shared.training import (
    HealthProbe,
    MicroBatch,
    build_lr_lambda,
    load_causal_lm,
    resolve_dtype,
    run_optimizer_step,
)


@dataclass
class SFTDataConfig:
    train_file: str = ""  # .jsonl (or .json list) of prompt/completion records, e.g. DATA/srt_stage1.jsonl
    extra_fields: Literal["error", "ignore"] = "error"  # record keys outside the known set
    layout: Literal["revision", "prompt_completion"] = "revision"  # SRT stages, or plain one-stage SFT data


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # dtype = master weights (auto = float32)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # used when no sdzero_prompt.json is found
    prompt_source: Literal["auto", "config"] = "auto"  # auto: data dir's spec, else model dir's, else config
    stage: int = 1  # 1: x -> y_init + P_r + y_revised; 2: revision only
    stage2_layout: Literal["continuation", "user_turn"] = "continuation"  # user_turn = reference layout
    output_dir: str = ""  # required; checkpoints/, final/, metrics.jsonl, config.yaml
    lr: float = 5e-6  # peak learning rate
    epochs: int = 3  # passes over the data (defines the LR schedule)
    max_steps: int = -1  # stop after this many optimizer steps (-1 = none); does not change the schedule
    warmup_ratio: float = 0.05  # fraction of the schedule's steps with linear warm-up from 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up ...
    min_lr_ratio: float = 0.0  # ... to lr x this (SSD: 5e-6 -> 1e-6 = 0.2)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8  # AdamW epsilon
    adam_fused: bool = False  # torch's fused AdamW kernel (CUDA and CPU; same update up to rounding)
    weight_decay: float = 1e-4  # AdamW decoupled decay (not on biases / norm weights, as HF Trainer)
    max_grad_norm: float = 1.0  # global L2 clip; <= 0 = no clipping (the norm is still logged)
    max_length: int = 32768  # tokens per sequence (prompt + completion)
    micro_batch_size: int = 1  # sequences per forward per rank
    grad_accum: int = 1  # micro-batches per optimizer step per rank
    batching: Literal["length_grouped", "none"] = "length_grouped"  # length_grouped: little padding
    packing: bool = False  # each micro-batch as one packed row without padding (same loss and gradients)
    overlong: Literal["truncate", "drop"] = "truncate"  # truncate cuts the completion, keeps the prompt
    seed: int = 0  # data order and torch seed
    activation_checkpointing: bool = True  # recompute decoder layers in backward (reference: on)
    compile_backend: str = ""  # torch.compile each decoder layer with this backend ("inductor"); "" = off
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 compute on CUDA, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # transformers attention
    loss_chunk_size: int = 4096  # rows of logits computed at once in the loss
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # final/ weights; auto = base's
    save_every: int = 1000  # steps between resumable checkpoints; 0 = none
    keep_last: int = 2  # checkpoints kept; 0 = all
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    wandb: bool = False  # log to Weights & Biases when installed (WANDB_* env vars apply)
    wandb_project: str = "sd-zero"  # W&B project
    tensorboard: bool = False  # write output_dir/tensorboard when tensorboard is installed
    health_metrics: bool = True  # gradient noise scale, weights changed, update ratio (shared/health.py)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if not self.model.path or not self.data.train_file:
            raise ConfigError("model.path and data.train_file are required")
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.lr <= 0 or self.epochs < 1:
            raise ConfigError(f"lr must be > 0 and epochs >= 1, got lr={self.lr}, epochs={self.epochs}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (none) or >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        for key in ("max_length", "micro_batch_size", "grad_accum", "loss_chunk_size", "log_every"):
            if getattr(self, key) < 1 or (key == "max_length" and self.max_length < 2):
                raise ConfigError(f"{key} must be >= 1 (max_length >= 2), got {getattr(self, key)}")
        if self.save_every < 0 or self.keep_last < 0 or self.weight_decay < 0 or self.adam_eps <= 0:
            raise ConfigError("save_every, keep_last, weight_decay must be >= 0 and adam_eps > 0")


# Settings a resumed SFT run may change (fnmatch patterns on dotted keys); anything else must equal the
# checkpoint's. micro_batch_size and grad_accum may change with the world size as long as the global batch
# (micro x accum x world) stays, which the checkpoint load checks; activation_checkpointing and
# loss_chunk_size change memory and speed only; lr is applied to the optimizer and the scheduler.
RESUME_ALLOWED = tuple(
    "max_steps save_every keep_last log_every wandb wandb_project tensorboard output_dir save_dtype "
    "micro_batch_size grad_accum activation_checkpointing loss_chunk_size lr health_metrics".split()
)


def check_resume_settings(cfg: SFTConfig) -> dict[str, tuple[Any, Any]]:
    """Compare with the run being resumed (newest checkpoint, or the finished run's config.yaml).

    Returns the allowed settings that changed ({key: (saved, current)}); raises SystemExit listing the
    others. A fresh output_dir returns {}.
    """
    out = Path(cfg.output_dir)
    existing = checkpoints.list_checkpoints(out / "checkpoints", "sft")
    if existing:
        saved = json.loads((existing[-1] / "trainer_state.json").read_text(encoding="utf-8"))["config"]
        where = str(existing[-1])
    elif (out / "final" / "sft_state.json").is_file() and (out / "config.yaml").is_file():
        saved, where = load_yaml((out / "config.yaml").read_text(encoding="utf-8")), str(out / "final")
    else:
        return {}
    try:
        return check_resume_config(saved, to_dict(cfg), allowed=RESUME_ALLOWED, where=f"SFT from {where}")
    except ConfigError as exc:
        raise SystemExit(f"[sft] {exc}") from None


# ----------------------------------------------------------------------------------------------
# building blocks (also used by scripts/bench_sft.py)


def resolve_prompt_config(cfg: SFTConfig, tokenizer: Any) -> tuple[PromptConfig, str]:
    """The prompt config the data was built with: data dir's sdzero_prompt.json, model dir's, or config."""
    if cfg.prompt_source == "auto":
        for directory in (Path(cfg.data.train_file).parent, Path(cfg.model.path)):
            if (directory / PROMPT_SPEC_FILE).is_file():
                prompt_cfg, spec = load_prompt_spec(directory)
                if cfg.prompt != PromptConfig() and cfg.prompt != prompt_cfg:
                    raise ConfigError(
                        f"prompt.* is set in the config but {directory / PROMPT_SPEC_FILE} differs; "
                        "set prompt_source=config to use the config's prompt"
                    )
                check_prompt_spec(spec, tokenizer, prompt_cfg)
                return prompt_cfg, str(directory / PROMPT_SPEC_FILE)
    return cfg.prompt, "config"


def build_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=cfg.adam_fused or None
    )


def count_units(batch: dict[str, torch.Tensor]) -> list[float]:
    """[trained tokens (the loss normaliser), tokens] of one micro-batch."""
    trained = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    tokens = float(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
    return [trained, tokens]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[dict[str, torch.Tensor], float]],
    max_grad_norm: float,
    health: HealthProbe | None = None,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches [(batch, weight)]; weight 0 = dummy filler."""
    result = run_optimizer_step(
        model,
        optimizer,
        [MicroBatch(batch, weight) for batch, weight in micro_batches],
        forward=lambda batch: (model(**batch)[0], None),
        count=count_units,
        max_grad_norm=max_grad_norm,
        device=micro_batches[0][0]["input_ids"].device,
        health=health,
    )
    return {
        **result.health,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "num_completion_tokens": result.counts[0],
        "num_tokens": result.counts[1],
    }


def collate(
    examples: list[SFTExample], pad_id: int, device: torch.device, packing: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] tensors (attention_mask only when there is padding), or (packing) one row
    [1, sum of lengths] without padding: position ids restart at 0 for each example, so attention stays
    inside each one (`target_logits.packed_position_ids`), and each example's first label is ignored (it
    would be predicted by the previous example's last token; in the padded layout no position predicts it)."""
    if packing:
        if any(len(ex.labels) != len(ex.input_ids) for ex in examples):
            raise ValueError("packing needs one label per input token in every example")
        ids = [t for ex in examples for t in ex.input_ids]
        labels = [t for ex in examples for t in [IGNORE_INDEX, *ex.labels[1:]]]
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": packed_position_ids([len(ex.input_ids) for ex in examples]),
        }
        return {k: v.to(device) for k, v in batch.items()}
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
        mask[row, : len(ex.input_ids)] = 1
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(width).expand(len(examples), -1),
    }
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def build_model(cfg: SFTConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """HF causal LM in the master-weights dtype, wrapped for the loss and sharded with FSDP2."""
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation=flash_attention_2 but flash_attn is not installed")
    causal_lm = load_causal_lm(
        cfg.model, resolve_dtype(cfg.model.dtype), attn_implementation=cfg.attn_implementation
    )
    causal_lm.config.use_cache = False
    if cfg.packing:  # sdpa -> per-sequence causal attention; refuse a model that would mix sequences
        use_packed_attention(causal_lm)
        check_packed_attention(causal_lm)  # before sharding: a plain forward of the unwrapped model
    mixed = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    model = CompletionLossModel(causal_lm, cfg.loss_chunk_size)
    dist_utils.wrap_fsdp(
        model,
        device,
        mixed_precision=mixed,
        activation_checkpointing=cfg.activation_checkpointing,
        compile_backend=cfg.compile_backend,
    )
    model.train()
    return model, causal_lm.config, mixed


def log0(*args: Any) -> None:
    if dist_utils.is_main():
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SFTConfig, argv, description=__doc__)
    changed = check_resume_settings(cfg)  # before anything starts: a refused resume exits here
    device = dist_utils.init()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    ckpt_root, final_dir = out / "checkpoints", out / "final"
    lock = None
    if dist_utils.is_main():
        try:
            lock = acquire_run_lock(out, "SFT")  # held by rank 0 until the end (or its death)
        except RunLockError as exc:
            raise SystemExit(f"[sft] {exc}") from None
        removed = checkpoints.remove_partial(ckpt_root)
        if removed:
            print(f"removed partial checkpoint(s): {[p.name for p in removed]}")
        if changed:
            print(f"[sft] resuming with changed settings: {changed}", flush=True)
    dist_utils.barrier()

    # -- data
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    prompt_cfg, prompt_from = resolve_prompt_config(cfg, tokenizer)
    examples, report = build_sft_examples(
        tokenizer,
        load_records(cfg.data.train_file),
        stage=cfg.stage,
        prompt_cfg=prompt_cfg,
        max_length=cfg.max_length,
        stage2_layout=cfg.stage2_layout,
        overlong=cfg.overlong,
        extra_fields=cfg.data.extra_fields,
        layout=cfg.data.layout,
    )
    log0(f"[sft] stage {cfg.stage} data {cfg.data.train_file}: {report.summary()}; prompt from {prompt_from}")
    if not examples:
        raise SystemExit(f"no training examples left in {cfg.data.train_file}")
    lengths = [len(e.input_ids) for e in examples]
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = compute_steps_per_epoch(len(examples), global_batch)
    schedule_steps = steps_per_epoch * cfg.epochs
    last_step = schedule_steps if cfg.max_steps < 0 else min(schedule_steps, cfg.max_steps)
    state_file = final_dir / "sft_state.json"
    if state_file.is_file() and json.loads(state_file.read_text())["step"] >= last_step:
        log0(f"[sft] {final_dir} is already complete (step {last_step}); nothing to do")
        dist_utils.cleanup()
        if lock is not None:
            lock.release()
        return

    # -- model, optimizer, schedule, resume
    base_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    save_dtype = resolve_dtype(
        cfg.save_dtype if cfg.save_dtype != "auto" else getattr(base_config, "dtype", None)
    )
    try:
        generation_config = GenerationConfig.from_pretrained(cfg.model.path)
    except OSError:
        generation_config = None
    model, hf_config, mixed = build_model(cfg, device)
    health = (
        HealthProbe(
            forward_dtype=torch.bfloat16 if mixed else None,
            num_sequences=lambda b: int((b["position_ids"] == 0).sum()),  # one 0 per sequence, packed too
        )
        if cfg.health_metrics
        else None
    )
    budget = Budget(stage=f"sft_stage{cfg.stage}" if cfg.data.layout == "revision" else "sft")
    if dist_utils.is_main():  # the run's identity, once the model and data have loaded
        save_run_config(cfg, out)
    optimizer = build_optimizer(model, cfg)
    warmup_steps = math.ceil(cfg.warmup_ratio * schedule_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        build_lr_lambda(cfg.lr_schedule, schedule_steps, warmup_steps, final_factor=cfg.min_lr_ratio),
    )
    start_step = 0
    existing = checkpoints.list_checkpoints(ckpt_root, "sft")
    if existing:
        state = checkpoints.load_checkpoint(existing[-1], model, optimizer)
        if (state["global_batch"], state["num_examples"]) != (global_batch, len(examples)):
            raise SystemExit(
                f"cannot resume from {existing[-1]}: it was saved with global batch {state['global_batch']} "
                f"and {state['num_examples']} examples, this run has {global_batch} and {len(examples)} "
                "(world size may change only if micro_batch_size x grad_accum x world_size stays the same)"
            )
        scheduler.load_state_dict(state["scheduler"])
        if "budget" in state:
            budget = Budget.from_dict(state["budget"])
        if health is not None and "health" in state:  # the noise-scale EMA continues
            health.noise.load_state_dict(state["health"])
        saved_lr = state["config"]["lr"]
        if saved_lr != cfg.lr:  # allowed on resume, and really applied (not only recorded in config.yaml)
            checkpoints.apply_resumed_lr(optimizer, scheduler, saved_lr, cfg.lr)
            log0(f"[sft] lr {saved_lr:g} -> {cfg.lr:g}: applied to the optimizer and the schedule")
        start_step = state["step"]
        log0(
            f"[sft] resumed from {existing[-1]} (step {start_step}, saved with world size {state['world_size']})"
        )
    log0(
        f"[sft] world {world}, global batch {global_batch}, {steps_per_epoch} steps/epoch, schedule "
        f"{schedule_steps} steps ({warmup_steps} warm-up), training steps {start_step}..{last_step}"
    )
    logger = MetricsLogger(
        out / "metrics.jsonl",
        start_step,
        enabled=dist_utils.is_main(),
        config=to_dict(cfg),
        wandb=cfg.wandb,
        wandb_project=cfg.wandb_project,
        tensorboard=cfg.tensorboard,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dummy = SFTExample(examples[0].input_ids[:2], [IGNORE_INDEX] * 2, "dummy")

    for step in range(start_step, last_step):
        t0 = time.perf_counter()
        slots = build_step_batches(
            lengths,
            step,
            seed=cfg.seed,
            world_size=world,
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
            batching=cfg.batching,
        )[rank]
        micro = [
            (collate([examples[i] for i in idx], pad_id, device, cfg.packing), 1.0)
            if idx
            else (collate([dummy], pad_id, device, cfg.packing), 0.0)
            for idx in slots
        ]
        lr = scheduler.get_last_lr()[0]
        stats = train_step(model, optimizer, micro, cfg.max_grad_norm, health)
        scheduler.step()
        seconds = time.perf_counter() - t0
        budget.tokens_trained += int(stats["num_completion_tokens"])
        budget.optimizer_steps += 1
        budget.add_time("training", seconds)
        row = {
            "step": step + 1,
            "epoch": round((step + 1) / steps_per_epoch, 4),
            **stats,
            "lr": lr,
            "tokens_per_s": stats["num_tokens"] / seconds,
            "trained_tokens_per_s": stats["num_completion_tokens"] / seconds,
            "seconds": seconds,
            "peak_memory_gib": dist_utils.peak_memory_gib(device),
        }
        logger.log(row)
        if (step + 1) % cfg.log_every == 0 or step + 1 == last_step:
            log0(
                f"[sft] step {step + 1}/{last_step} epoch {row['epoch']:.2f} loss {stats['loss']:.4f} "
                f"lr {lr:.3g} grad_norm {stats['grad_norm']:.3f} tok/s {row['tokens_per_s']:.0f} {seconds:.2f}s"
            )
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            trainer_state = {
                "step": step + 1,
                "epoch": (step + 1) // steps_per_epoch,
                "world_size": world,
                "global_batch": global_batch,
                "num_examples": len(examples),
                "scheduler": scheduler.state_dict(),
                "config": to_dict(cfg),
                "budget": budget.state_dict(),
                **({"health": health.noise.state_dict()} if health is not None else {}),
            }
            path = checkpoints.save_checkpoint(
                ckpt_root, step + 1, model, optimizer, trainer_state, cfg.keep_last
            )
            log0(f"[sft] saved {path}")

    def extra_files(directory: Path) -> None:
        save_prompt_spec(directory, tokenizer, prompt_cfg)
        (directory / "sft_state.json").write_text(json.dumps({"step": last_step, "stage": cfg.stage}) + "\n")

    checkpoints.save_hf_export(
        model,
        final_dir,
        hf_config,
        tokenizer,
        save_dtype=save_dtype,
        generation_config=generation_config,
        strip_prefix="causal_lm.",
        extra_files=extra_files,
    )
    if dist_utils.is_main():
        budget.save(out)  # what this stage consumed (compare.sh holds methods to one budget)
    log0(f"[sft] wrote {final_dir}")
    dist_utils.cleanup()
    if lock is not None:
        lock.release()


if __name__ == "__main__":
    main()
