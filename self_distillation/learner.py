"""One FSDP2 rank of the Phase-2 student: the objective's update, weight export, checkpoints.

N ranks form one torch.distributed group (gloo on CPU, nccl on GPU) inside Ray actors (rank 0 picks
the rendezvous). Each training step gets `plan[optimizer step][micro-batch] = samples` for this rank
and runs `training.run_optimizer_step` per optimizer step (token mean over the whole step, all ranks),
with the objective chosen by name (`objectives.build_objective`); AdamW and the reference's
warm-up-then-constant LR (LinearLR from `warmup_start_factor`, then constant). A plain class: `actors.py`
places it, tests build it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from self_distillation.config import SelfDistillationConfig
from self_distillation.losses import Divergence
from self_distillation.objectives import build_objective, student_batch
from self_distillation.rollout_data import LearnerSample
from self_distillation.teacher import score_chunk, share_weights
from self_revision_training.shared import checkpoints
from self_revision_training.shared import distributed as dist_utils
from self_revision_training.shared.lora import adapters_disabled, apply_lora, merge_lora_state
from self_revision_training.shared.storage import atomic_write_json
from self_revision_training.shared.target_logits import (
    TargetLogitsLM,
    check_packed_attention,
    use_packed_attention,
)
from self_revision_training.shared.training import (
    HealthProbe,
    MicroBatch,
    load_causal_lm,
    resolve_dtype,
    run_optimizer_step,
    warmup_multiplier,
)


class Learner:
    """One FSDP2 rank of the student."""

    def __init__(self, cfg: SelfDistillationConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world = cfg, rank, world_size

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port (called on rank 0 to pick the rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        ray = sys.modules.get("ray")
        address = ray.util.get_node_ip_address() if ray is not None and ray.is_initialized() else "127.0.0.1"
        return address, port

    def setup(self, master_addr: str, master_port: int) -> None:
        cfg = self.cfg
        use_cuda = torch.cuda.is_available() and cfg.ray.num_gpus > 0
        self.device = dist_utils.init(
            rendezvous=(master_addr, master_port, self.rank, self.world), use_cuda=use_cuda
        )
        torch.manual_seed(cfg.seed + self.rank)
        from transformers import AutoConfig, AutoTokenizer

        causal_lm = load_causal_lm(cfg.student, resolve_dtype(cfg.student.dtype))
        causal_lm.config.use_cache = False
        if cfg.lora.enabled:
            apply_lora(causal_lm, cfg.lora)
        self.hf_config = AutoConfig.from_pretrained(
            cfg.student.path, trust_remote_code=cfg.student.trust_remote_code
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.student.path, trust_remote_code=cfg.student.trust_remote_code
        )
        self.tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
        self.divergence = Divergence.from_config(cfg.loss)
        self.objective = build_objective(
            cfg.objective, self.divergence, causal_lm.config.vocab_size, cfg.grpo, cfg.packing
        )
        if cfg.packing:  # sdpa -> per-sequence causal attention; refuse a model that would mix sequences
            use_packed_attention(causal_lm)
            check_packed_attention(causal_lm)  # before sharding: a plain forward of the unwrapped model
        if cfg.teacher_source == "learner" and self.divergence.top_k is None:
            self.objective.set_teacher_lm_head(None)  # the teacher's logits use the learner's own lm_head
        self.model = TargetLogitsLM(causal_lm, cfg.loss.chunk_size)
        mixed = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and use_cuda)
        dist_utils.wrap_fsdp(
            self.model,
            self.device,
            mixed_precision=mixed,
            activation_checkpointing=cfg.activation_checkpointing,
            compile_backend=cfg.compile_backend,
        )
        self.model.train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],  # with LoRA: the adapters only
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=o.fused or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_multiplier(step, o.warmup_steps, o.warmup_start_factor)
        )
        self.health = (
            HealthProbe(forward_dtype=torch.bfloat16 if mixed else None, num_sequences=len)
            if cfg.health_metrics
            else None
        )

    def set_teacher_lm_head(self, weight: torch.Tensor) -> None:
        """The teacher's [V, H] lm_head, for full-vocabulary distillation (`objectives.py`)."""
        self.objective.set_teacher_lm_head(weight.to(self.device))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    # -- training

    @torch.no_grad()
    def score_teacher(self, samples: list[LearnerSample]) -> list[dict[str, Any]]:
        """The teacher outputs of `samples`' teacher sequences with this learner's weights: the current ones
        (teacher_mode=live) or the base weights with the LoRA adapters disabled (frozen LoRA teacher)."""
        if not samples:
            return []
        batch = student_batch(
            [LearnerSample(s.teacher_ids, s.teacher_mask, s.reward, None) for s in samples],
            0,
            self.device,
            self.cfg.packing,
        )
        next_mask = batch["target_mask"][:, 1:].bool()
        base = self.cfg.teacher_mode == "frozen"
        self.model.eval()
        try:
            with adapters_disabled(self.model) if base else contextlib.nullcontext():
                chunks, _ = self.model(
                    batch["input_ids"],
                    batch.get("attention_mask"),
                    batch["position_ids"],
                    next_mask,
                    score_chunk,
                    (),
                    (self.divergence,),
                )
        finally:
            self.model.train()
        merged = {k: None if chunks[0][k] is None else torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        out, offset = [], 0
        for s in samples:
            n = sum(s.teacher_mask)
            out.append({k: None if v is None else v[offset : offset + n] for k, v in merged.items()})
            offset += n
        return out

    @torch.no_grad()
    def dump_tokens(self, samples: list[LearnerSample]) -> list[Any]:
        """All ranks, the same samples (FSDP collectives): per-token KL and top-5 of student and teacher at the
        current weights (`localization.TokenFields`), for the token dumps."""
        from self_distillation.token_dump import score_dump_samples

        if samples and samples[0].teacher is None:  # learner-scored teacher: score copies
            scores = self.score_teacher(samples)
            samples = [dataclasses.replace(s, teacher=t) for s, t in zip(samples, scores, strict=True)]
        weight = self.objective.teacher_weight if self.divergence.top_k is None else None
        return score_dump_samples(self.model, samples, self.pad_id, self.device, self.divergence, weight)

    def train_step(self, plan: list[list[list[LearnerSample]]]) -> dict[str, float]:
        """plan[optimizer step][micro-batch] = this rank's samples. Returns summed statistics (all ranks)."""
        stats = self.objective.new_stats()
        losses, grad_norms, lrs, num_tokens, health = [], [], [], 0.0, []
        for micro_batches in plan:
            for samples in micro_batches:  # learner-scored teacher: with the weights of this optimizer step
                if samples and samples[0].teacher is None:
                    for sample, teacher in zip(samples, self.score_teacher(samples), strict=True):
                        sample.teacher = teacher
            lrs.append(self.scheduler.get_last_lr()[0])
            result = run_optimizer_step(
                self.model,
                self.optimizer,
                [MicroBatch(samples) for samples in micro_batches],
                forward=lambda samples: self.objective.micro_batch_loss(
                    self.model, samples, self.pad_id, self.device
                ),
                count=self.objective.count,
                max_grad_norm=self.cfg.optim.max_grad_norm,
                device=self.device,
                health=self.health,
            )
            self.scheduler.step()
            health.append(result.health)
            for samples, values in zip(micro_batches, result.outputs, strict=True):
                self.objective.add_stats(stats, samples, values)
            losses.append(result.loss)
            grad_norms.append(result.grad_norm)
            num_tokens += result.counts[0]
        for reduce in ("sum", "max", "min"):
            stats.set_from_tensor(
                dist_utils.all_reduce(stats.to_tensor(reduce).to(self.device), op=reduce).cpu(), reduce
            )
        return {
            **stats.metrics(),
            **{f"train/{k}": v for k, v in health[-1].items()},  # the step's last optimizer step
            "loss": sum(losses) / len(losses),
            "grad_norm": grad_norms[-1],
            "lr": lrs[0],
            "num_tokens": num_tokens,
            "optimizer_steps": float(len(plan)),
        }

    @torch.no_grad()
    def evaluate(self, samples: list[LearnerSample]) -> dict[str, Any]:
        """No-grad objective and student target log-probs (same samples on every rank)."""
        self.model.eval()
        try:
            _, values = self.objective.micro_batch_loss(self.model, samples, self.pad_id, self.device)
        finally:
            self.model.train()
        divergence = values["divergence"]
        return {
            "kl_mean": float(divergence.mean()) if divergence.numel() else float("nan"),
            "student_logprobs": values["logprobs"].cpu(),
        }

    # -- weights and checkpoints

    def _rollout_state(self) -> dict[str, torch.Tensor] | None:
        """All ranks: gather the full student; rank 0 gets what a rollout engine loads (the plain model's
        weights, LoRA merged in, a tied lm_head left out: the engine re-ties it), other ranks None."""
        full = dist_utils.get_full_state_dict(self.model)
        if self.rank != 0:
            return None
        state = self._export_state({k.removeprefix("causal_lm."): v for k, v in full.items()})
        state = {k: v.contiguous() for k, v in state.items()}
        if self.tied:
            state.pop("lm_head.weight", None)  # the engine re-ties it to the embedding
        return state

    def save_weights(self, directory: str) -> str:
        """All ranks: gather the full student; rank 0 writes `directory/model.safetensors` atomically."""
        from safetensors.torch import save_file

        state = self._rollout_state()
        if state is not None:
            out = Path(directory)
            tmp = out.with_name(f".tmp_{out.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        dist_utils.barrier()
        return directory

    def export_weights(self, to_object_store: bool) -> Any:
        """All ranks: gather the full student (as `save_weights`, without the file). Rank 0 returns the
        tensors, or, running as a Ray actor (`to_object_store`), `[ref]`: the one ObjectRef of them
        (`teacher.share_weights`) it put into Ray's object store, for every rollout engine and the teacher to
        read (the list keeps Ray from treating the ref as this call's result). Other ranks return None.

        Without Ray the tensors may alias this learner's parameters (a 1-rank CPU gather need not copy):
        every consumer copies them into its own model before the learner's next step."""
        state = self._rollout_state()
        if state is None or not to_object_store:
            return state
        import ray

        return [ray.put(share_weights(state))]  # numpy views: every reader maps the one shared copy

    def save_checkpoint(self, directory: str) -> None:
        """All ranks: DCP shards of model + optimizer, this rank's RNG, rank 0 the scheduler."""
        checkpoints.save_training_state(directory, self.model, self.optimizer)
        if self.rank == 0:
            atomic_write_json(Path(directory) / "scheduler.json", self.scheduler.state_dict())
            if self.health is not None:
                atomic_write_json(Path(directory) / "health.json", self.health.noise.state_dict())
        dist_utils.barrier()

    def load_checkpoint(self, directory: str) -> None:
        checkpoints.load_training_state(directory, self.model, self.optimizer)
        self.scheduler.load_state_dict(json.loads((Path(directory) / "scheduler.json").read_text()))
        health = Path(directory) / "health.json"
        if self.health is not None and health.is_file():  # the noise-scale EMA continues
            self.health.noise.load_state_dict(json.loads(health.read_text()))

    def export_hf(self, directory: str, prompt_spec: dict[str, Any]) -> None:
        """All ranks: the consolidated Hugging Face directory (+ sdzero_prompt.json)."""

        def extra(path: Path) -> None:
            atomic_write_json(path / "sdzero_prompt.json", prompt_spec)

        from transformers import GenerationConfig

        try:  # the student's EOS set etc., as SFT's final/ carries it (vLLM reads it at evaluation)
            generation_config = GenerationConfig.from_pretrained(self.cfg.student.path)
        except OSError:
            generation_config = None
        checkpoints.save_hf_export(
            self.model,
            directory,
            self.hf_config,
            self.tokenizer,
            save_dtype=resolve_dtype(getattr(self.hf_config, "dtype", None)),
            generation_config=generation_config,
            strip_prefix="causal_lm.",
            extra_files=extra,
            transform=self._export_state,
        )

    def _export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the rollout engine and final/ receive: the plain model's weights (LoRA merged in)."""
        return merge_lora_state(state, self.cfg.lora) if self.cfg.lora.enabled else state

    def get_state(self) -> dict[str, Any]:
        """Full model + optimizer + scheduler state on CPU (tests compare runs with it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}

    def close(self) -> None:
        dist_utils.cleanup()
