"""Phase-2 workers as plain classes, and the thin Ray shells that place them (adapter layer).

- `RolloutWorker`: the generation backend (vLLM, or transformers as fallback); weight reload from a
  safetensors directory (CPU path; an NCCL/IPC GPU path is not implemented).
- `VerifierPool`: the shared math verifier (math-verify in worker processes, `rewards.build_verifier`).
- `Teacher`: the frozen SRT model; scores teacher sequences at the target positions only and returns
  top-k ids + log-probs (or full-vocabulary log-probs when `loss.top_k` is null).
- `Learner`: one rank of the FSDP2 student (AdamW, warm-up-then-constant LR); N ranks form a
  torch.distributed group (gloo on CPU, nccl on GPU) inside Ray actors.
`ActorHandle` / `LearnerGroup` run these either as Ray actors (`ray.remote(num_gpus=...)(cls)`, resources
applied at construction) or as local objects (`ray.enabled=false`), with the same call interface; a dead
actor raises `ActorFailure` naming the actor, the call and the step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from self_distillation.config import LossConfig, SelfDistillationConfig
from self_distillation.losses import StudentDistillationModel
from self_distillation.rollout_data import collate_sequences
from self_revision_training.shared.config import BackendConfig, GradingConfig, ModelConfig, SamplingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ActorFailure(RuntimeError):
    """An actor died or raised; the message names the actor, the call and the step."""


# ----------------------------------------------------------------------------------------------
# plain workers


class RolloutWorker:
    """Samples responses; reloads weights written by the learner."""

    def __init__(self, model: ModelConfig, backend: BackendConfig):
        from self_revision_training.shared.generation import create_backend

        self.backend = create_backend(model, backend)

    def info(self) -> dict[str, Any]:
        return {
            "eos_token_ids": sorted(self.backend.eos_token_ids),
            "max_model_len": self.backend.max_model_len,
        }

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, max_tokens: list[int], call_key: int
    ) -> tuple[list[list[tuple[list[int], str, str, list[float] | None]]], int]:
        """-> (per prompt, per sample (token ids, text, finish reason, log-probs)), policy version."""
        from self_revision_training.shared.generation import HFBackend

        if isinstance(self.backend, HFBackend):
            # HFBackend derives each call's seed from (engine seed, call counter); setting the counter from
            # the step makes a resumed run replay the uninterrupted run's samples.
            self.backend.set_call_index(call_key)
        out = self.backend.generate(prompts, sampling, max_tokens=max_tokens, return_logprobs=True)
        rows = [[(s.token_ids, s.text, s.finish_reason, s.logprobs) for s in row] for row in out]
        return rows, self.backend.policy_version

    def update_weights(self, weights_dir: str) -> int:
        self.backend.update_weights(weights_dir)
        return self.backend.policy_version

    def close(self) -> None:
        self.backend.close()


class VerifierPool:
    """Binary rewards; empty responses are r=0 without a verifier call."""

    def __init__(self, mode: str, cfg: GradingConfig):
        from self_revision_training.shared.rewards import build_verifier

        self.verifier = build_verifier(mode, cfg)

    def grade(self, responses: list[str], problems: list[Any]) -> list[tuple[bool, str]]:
        todo = [i for i, r in enumerate(responses) if r.strip()]
        verdicts = (
            self.verifier.grade([responses[i] for i in todo], [problems[i] for i in todo]) if todo else []
        )
        out = [(False, "empty_response")] * len(responses)
        for i, v in zip(todo, verdicts, strict=True):
            out[i] = (bool(v.correct), v.reason)
        return out

    def close(self) -> None:
        self.verifier.close()


def _load_causal_lm(model: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model.path, dtype=dtype, trust_remote_code=model.trust_remote_code
    )


def _weights_state(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


class Teacher:
    """Frozen teacher: log-probs at the target positions of teacher sequences (no grad, eval mode)."""

    def __init__(
        self,
        model: ModelConfig,
        loss: LossConfig,
        device: str | None = None,
        offload: bool = False,
        micro_batch_size: int = 4,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = (
            torch.float32 if model.dtype == "auto" and self.device.type == "cpu" else DTYPES.get(model.dtype)
        )
        self.model = _load_causal_lm(model, dtype or torch.bfloat16).eval().requires_grad_(False)
        self.loss = loss
        self.offload = offload and self.device.type == "cuda"  # colocated GPU runs: free memory when idle
        self.micro_batch_size = micro_batch_size
        self.model.to("cpu" if self.offload else self.device)

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[dict[str, torch.Tensor | None]]:
        """Per sequence: ids [n, k] (None when full-vocabulary), logprobs [n, k or V] at temperature T,
        target_logprobs [n] (raw distribution), for its n target tokens in order."""
        if self.offload:
            self.model.to(self.device)
        results = []
        temperature, top_k = self.loss.temperature, self.loss.top_k
        for start in range(0, len(sequences), self.micro_batch_size):
            chunk = sequences[start : start + self.micro_batch_size]
            batch = {k: v.to(self.device) for k, v in collate_sequences(chunk, 0).items()}
            hidden = self.model.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            ).last_hidden_state  # [B, T, H]
            for row in range(len(chunk)):
                predicts = batch["target_mask"][row, 1:].bool()  # [T-1]
                logits = self.model.lm_head(hidden[row, :-1][predicts]).float()  # [n, V]
                targets = batch["input_ids"][row, 1:][predicts]  # [n]
                raw = logits.log_softmax(-1)
                target_lp = raw.gather(-1, targets[:, None]).squeeze(-1)
                scaled = raw if temperature == 1.0 else (logits / temperature).log_softmax(-1)
                if top_k is not None and top_k < scaled.shape[-1]:
                    values, ids = scaled.topk(top_k, dim=-1)
                    results.append(
                        {"ids": ids.int().cpu(), "logprobs": values.cpu(), "target_logprobs": target_lp.cpu()}
                    )
                else:
                    results.append(
                        {"ids": None, "logprobs": scaled.cpu(), "target_logprobs": target_lp.cpu()}
                    )
        if self.offload:
            self.model.to("cpu")
        return results

    def load_weights(self, weights_dir: str, ema_decay: float = 0.0) -> None:
        """Teacher sync: copy (ema_decay 0) or EMA-blend the student's weights into the teacher."""
        state = _weights_state(weights_dir)
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                target = own[key]
                value = value.to(target.device, target.dtype)
                target.copy_(value if ema_decay == 0 else ema_decay * target + (1 - ema_decay) * value)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def save_weights(self, directory: str) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(Path(directory) / "model.safetensors"))


@dataclass
class LearnerSample:
    student_ids: list[int]
    student_mask: list[int]
    reward: bool
    rollout_logprobs: list[float] | None
    teacher: dict[str, torch.Tensor | None]  # Teacher.score output for this sample


class Learner:
    """One FSDP2 rank of the student: the distillation update, weight export, checkpoints."""

    def __init__(self, cfg: SelfDistillationConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world = cfg, rank, world_size

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port (called on rank 0 to pick the rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        import sys

        ray = sys.modules.get("ray")
        address = ray.util.get_node_ip_address() if ray is not None and ray.is_initialized() else "127.0.0.1"
        return address, port

    def setup(self, master_addr: str, master_port: int) -> None:
        import torch.distributed as dist

        from self_revision_training.shared import distributed as dist_utils

        cfg = self.cfg
        use_cuda = torch.cuda.is_available() and cfg.ray.num_gpus > 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if use_cuda else "gloo",
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=self.rank,
                world_size=self.world,
            )
        torch.manual_seed(cfg.seed + self.rank)
        from transformers import AutoConfig, AutoTokenizer

        dtype = torch.float32 if cfg.student.dtype == "auto" else DTYPES[cfg.student.dtype]
        causal_lm = _load_causal_lm(cfg.student, dtype)
        causal_lm.config.use_cache = False
        self.hf_config = AutoConfig.from_pretrained(
            cfg.student.path, trust_remote_code=cfg.student.trust_remote_code
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.student.path, trust_remote_code=cfg.student.trust_remote_code
        )
        self.tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
        options = {
            "kl_type": cfg.loss.kl_type,
            "mixed_kl_weight": cfg.loss.mixed_kl_weight,
            "jsd_beta": cfg.loss.jsd_beta,
            "temperature": cfg.loss.temperature,
        }
        self.model = StudentDistillationModel(causal_lm, options, cfg.loss.chunk_size)
        mixed = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and use_cuda)
        dist_utils.wrap_fsdp(
            self.model,
            self.device,
            mixed_precision=mixed,
            activation_checkpointing=cfg.activation_checkpointing,
        )
        self.model.train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )

        def multiplier(
            step: int,
        ) -> float:  # reference: LinearLR(start_factor -> 1 over warm-up), then constant
            if step >= o.warmup_steps:
                return 1.0
            return o.warmup_start_factor + (1.0 - o.warmup_start_factor) * step / o.warmup_steps

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)

    # -- training

    def _forward(self, samples: list[LearnerSample]):
        if samples:
            batch = collate_sequences(
                [(s.student_ids, s.student_mask) for s in samples], self.tokenizer.pad_token_id or 0
            )
            parts = [s.teacher for s in samples]
        else:  # dummy micro-batch (ranks must run the same number of forwards): no targets
            batch = collate_sequences([([0, 0], [0, 0])], 0)
            parts = []
        k = self.cfg.loss.top_k
        full = k is None or (parts and parts[0]["ids"] is None)
        if parts:
            teacher_logprobs = torch.cat([p["logprobs"] for p in parts])
            teacher_ids = None if full else torch.cat([p["ids"] for p in parts]).long()
        else:
            width = len(self.tokenizer) if full else k
            teacher_logprobs = torch.zeros(0, width)
            teacher_ids = None if full else torch.zeros(0, width, dtype=torch.long)
        batch = {key: v.to(self.device) for key, v in batch.items()}
        return self.model(
            **batch,
            teacher_logprobs=teacher_logprobs.to(self.device),
            teacher_ids=None if teacher_ids is None else teacher_ids.to(self.device),
        )

    def train_step(self, plan: list[list[list[LearnerSample]]]) -> dict[str, float]:
        """plan[optimizer step][micro-batch] = this rank's samples. Returns summed statistics (all ranks)."""
        from self_revision_training.shared import distributed as dist_utils

        totals = torch.zeros(12, dtype=torch.float64)
        rollout_max = torch.zeros(1, dtype=torch.float64)
        losses, grad_norms, lrs = [], [], []
        for micro_batches in plan:
            local = sum(sum(s.student_mask) for mb in micro_batches for s in mb)
            count = dist_utils.all_reduce(
                torch.tensor([float(local)], dtype=torch.float64, device=self.device)
            )
            global_tokens = max(float(count[0]), 1.0)
            scale = self.world / global_tokens  # FSDP2 averages gradients over ranks
            loss_sum = 0.0
            for samples in micro_batches:
                divergence, student_lp = self._forward(samples)
                (divergence.sum() * scale).backward()
                loss_sum += float(divergence.detach().sum())
                offset = 0
                for s in samples:
                    n = sum(s.student_mask)
                    div, lp = (
                        divergence.detach()[offset : offset + n].double().cpu(),
                        student_lp[offset : offset + n].double().cpu(),
                    )
                    offset += n
                    r = 1 if s.reward else 0
                    totals[0] += div.sum()
                    totals[1] += n
                    totals[2 + 2 * r] += div.sum()  # kl_sum_r0 at 2, kl_sum_r1 at 4
                    totals[3 + 2 * r] += n
                    totals[6] += (s.teacher["target_logprobs"].double() - lp).sum()
                    if s.rollout_logprobs is not None and len(s.rollout_logprobs) == n:
                        diff = (torch.tensor(s.rollout_logprobs, dtype=torch.float64) - lp).abs()
                        totals[7] += diff.sum()
                        totals[8] += n
                        rollout_max[0] = max(float(rollout_max[0]), float(diff.max()) if n else 0.0)
            max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], max_norm
            )
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lrs.append(self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            summed = dist_utils.all_reduce(torch.tensor([loss_sum], dtype=torch.float64, device=self.device))
            losses.append(float(summed[0]) / global_tokens)
            grad_norms.append(float(grad_norm))
        totals = dist_utils.all_reduce(totals.to(self.device)).cpu()
        rollout_max = dist_utils.all_reduce(rollout_max.to(self.device), op="max").cpu()
        names = [
            "kl_sum",
            "num_tokens",
            "kl_sum_r0",
            "num_tokens_r0",
            "kl_sum_r1",
            "num_tokens_r1",
            "logprob_gap_sum",
            "rollout_logprob_abs_diff_sum",
            "rollout_tokens",
        ]
        out = {name: float(totals[i]) for i, name in enumerate(names)}
        out["rollout_logprob_abs_diff_max"] = float(rollout_max[0]) if out["rollout_tokens"] else float("nan")
        out |= {
            "loss": sum(losses) / len(losses),
            "grad_norm": grad_norms[-1],
            "lr": lrs[0],
            "optimizer_steps": float(len(plan)),
        }
        return out

    @torch.no_grad()
    def evaluate(self, samples: list[LearnerSample]) -> dict[str, Any]:
        """No-grad divergence and student target log-probs (same samples on every rank)."""
        self.model.eval()
        try:
            divergence, student_lp = self._forward(samples)
        finally:
            self.model.train()
        return {
            "kl_mean": float(divergence.mean()) if divergence.numel() else float("nan"),
            "student_logprobs": student_lp.cpu(),
        }

    # -- weights and checkpoints

    def save_weights(self, directory: str) -> str:
        """All ranks: gather the full student; rank 0 writes `directory/model.safetensors` atomically."""
        from safetensors.torch import save_file

        from self_revision_training.shared import distributed as dist_utils

        full = dist_utils.get_full_state_dict(self.model)
        if self.rank == 0:
            state = {k.removeprefix("causal_lm."): v.contiguous() for k, v in full.items()}
            if self.tied:
                state.pop("lm_head.weight", None)  # the engine re-ties it to the embedding
            out = Path(directory)
            tmp = out.with_name(f".tmp_{out.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        dist_utils.barrier()
        return directory

    def save_checkpoint(self, directory: str) -> None:
        """All ranks: DCP shards of model + optimizer, this rank's RNG, rank 0 the scheduler."""
        from self_revision_training.shared import distributed as dist_utils

        Path(directory).mkdir(parents=True, exist_ok=True)
        dist_utils.save_sharded_state(self.model, self.optimizer, Path(directory) / "model_optim")
        torch.save({"torch": torch.get_rng_state()}, Path(directory) / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            (Path(directory) / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
        dist_utils.barrier()

    def load_checkpoint(self, directory: str) -> None:
        from self_revision_training.shared import distributed as dist_utils

        dist_utils.load_sharded_state(self.model, self.optimizer, Path(directory) / "model_optim")
        self.scheduler.load_state_dict(json.loads((Path(directory) / "scheduler.json").read_text()))
        rng = Path(directory) / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=False)["torch"])

    def export_hf(self, directory: str, prompt_spec: dict[str, Any]) -> None:
        """All ranks: the consolidated Hugging Face directory (+ sdzero_prompt.json)."""
        from self_revision_training.shared import checkpoints
        from self_revision_training.shared.storage import atomic_write_json

        def extra(path: Path) -> None:
            atomic_write_json(path / "sdzero_prompt.json", prompt_spec)

        dtype = getattr(self.hf_config, "dtype", None)
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        checkpoints.save_hf_export(
            self.model,
            directory,
            self.hf_config,
            self.tokenizer,
            save_dtype=dtype or torch.float32,
            strip_prefix="causal_lm.",
            extra_files=extra,
        )

    def get_state(self) -> dict[str, Any]:
        """Full model + optimizer + scheduler state on CPU (tests compare runs with it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}

    def close(self) -> None:
        from self_revision_training.shared import distributed as dist_utils

        dist_utils._OWN_GROUP = True  # this rank created the group in setup()
        dist_utils.cleanup()


# ----------------------------------------------------------------------------------------------
# shells


class ActorHandle:
    """One worker, as a Ray actor (`remote=True`) or a local object, with failures named."""

    def __init__(self, name: str, cls: type, args: tuple, *, remote: bool, options: dict | None = None):
        self.name, self.remote = name, remote
        if remote:
            import ray

            self.actor = ray.remote(**(options or {}))(cls).remote(*args)
        else:
            self.actor = cls(*args)

    def submit(self, method: str, *args: Any) -> Any:
        """A future (Ray) or the result (local); resolve with `resolve`."""
        if self.remote:
            return getattr(self.actor, method).remote(*args)
        try:
            return getattr(self.actor, method)(*args)
        except Exception as exc:
            raise ActorFailure(f"actor '{self.name}' failed in {method}: {exc!r}") from exc

    def call(self, method: str, *args: Any, context: str = "") -> Any:
        return resolve([self.submit(method, *args)], [self], method, context)[0]

    def kill(self) -> None:
        if self.remote:
            import ray

            ray.kill(self.actor)


def resolve(futures: list[Any], handles: list[ActorHandle], method: str, context: str = "") -> list[Any]:
    """Wait for results; a Ray error becomes ActorFailure naming the actor, method and step context."""
    if not any(h.remote for h in handles):
        return futures
    import ray

    results = []
    for future, handle in zip(futures, handles, strict=True):
        try:
            results.append(ray.get(future))
        except (ray.exceptions.RayError, RuntimeError) as exc:
            raise ActorFailure(f"actor '{handle.name}' failed in {method} {context}: {exc}") from exc
    return results


class LearnerGroup:
    """N `Learner` ranks forming one torch.distributed group."""

    def __init__(self, cfg: SelfDistillationConfig, gpus_per_rank: float):
        remote = cfg.ray.enabled
        if not remote and cfg.ray.num_learners != 1:
            raise ValueError("ray.enabled=false runs one learner rank in the driver; set ray.num_learners=1")
        options = {"num_gpus": gpus_per_rank, "num_cpus": cfg.ray.learner_cpus, **_thread_env(cfg)}
        n = cfg.ray.num_learners
        self.handles = [
            ActorHandle(f"learner[{r}]", Learner, (cfg, r, n), remote=remote, options=options)
            for r in range(n)
        ]
        addr, port = self.handles[0].call("address")
        port = cfg.ray.master_port or port
        self.call_all("setup", [(addr, port)] * n)

    def call_all(self, method: str, per_rank_args: list[tuple] | None = None, context: str = "") -> list[Any]:
        args = per_rank_args or [()] * len(self.handles)
        futures = [h.submit(method, *a) for h, a in zip(self.handles, args, strict=True)]
        return resolve(futures, self.handles, method, context)

    def kill(self) -> None:
        for h in self.handles:
            h.kill()


def _thread_env(cfg: SelfDistillationConfig) -> dict[str, Any]:
    """Ray gives an actor with num_cpus=0 one OpenMP thread; rollout, teacher and training run one after
    another, so on a CPU machine the teacher and learners may use more (ray.cpu_threads)."""
    if cfg.ray.cpu_threads <= 0 or not cfg.ray.enabled:
        return {}
    return {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg.ray.cpu_threads)}}}


def build_workers(cfg: SelfDistillationConfig) -> dict[str, Any]:
    """Place rollout worker, verifier, teacher and learner ranks per `cfg.ray` (resources at construction)."""
    remote = cfg.ray.enabled
    if remote:
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.ray.address, include_dashboard=False)
    gpus = cfg.ray.num_gpus
    if gpus == 0:
        learner_gpus = rollout_gpus = teacher_gpus = 0.0
    elif cfg.ray.placement == "colocated":  # rank r's GPU also hosts ~engine and teacher shares
        learner_gpus, rollout_gpus, teacher_gpus = 0.5, 0.25, 0.25
    else:
        learner_gpus, rollout_gpus, teacher_gpus = 1.0, cfg.ray.rollout_gpus, cfg.ray.teacher_gpus
        if cfg.ray.num_learners + rollout_gpus + teacher_gpus > gpus:
            raise ValueError(
                f"split placement needs {cfg.ray.num_learners + rollout_gpus + teacher_gpus} GPUs, have {gpus}"
            )
    on = dict(num_cpus=0)
    rollout = ActorHandle(
        "rollout",
        RolloutWorker,
        (cfg.student, cfg.backend),
        remote=remote,
        options={**on, "num_gpus": rollout_gpus},
    )
    verifier = ActorHandle(
        "verifier", VerifierPool, (cfg.train_data.mode, cfg.grading), remote=remote, options=on
    )
    teacher_device = "cuda" if gpus > 0 else "cpu"
    teacher = ActorHandle(
        "teacher",
        Teacher,
        (cfg.teacher, cfg.loss, teacher_device, cfg.teacher_offload and cfg.ray.placement == "colocated"),
        remote=remote,
        options={**on, "num_gpus": teacher_gpus, **_thread_env(cfg)},
    )
    learners = LearnerGroup(cfg, learner_gpus)
    return {"rollout": rollout, "verifier": verifier, "teacher": teacher, "learners": learners}
