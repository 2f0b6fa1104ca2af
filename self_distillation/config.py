"""Typed configuration of Phase 2, on-policy self-distillation (`self_distillation.train`).

defaults < `configs/phase2_distill.yaml` < CLI dotted overrides (`loss.kl_type=reverse`); an unknown key
is an error. Defaults follow the reference run (sdzero_reference.md §5.1-5.2) except where noted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from self_distillation.losses import Divergence, KLType
from self_revision_training.shared.config import (
    BackendConfig,
    ConfigError,
    DatasetConfig,
    GradingConfig,
    LoRAConfig,
    ModelConfig,
    PromptConfig,
    SamplingConfig,
)
from self_revision_training.shared.rewards import RewardName
from self_revision_training.shared.rewards.majority_vote import VoteConfig

TeacherContextName = Literal[  # teacher_context.TEACHER_CONTEXTS
    "self_revision", "reference_solution", "revision_with_solution", "successful_sibling", "none"
]
ObjectiveName = Literal["distillation", "grpo"]  # objectives.OBJECTIVE_NAMES


@dataclass
class GRPOConfig:
    """objective=grpo (self_distillation/grpo.py): the policy-gradient baseline in the same loop."""

    scale_rewards: Literal["group", "none"] = "group"  # group: (r - mean) / (std + eps); none: Dr. GRPO
    eps: float = 1e-6  # added to the group's std
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO: separate clips)
    clip_high: float = 0.28
    kl_coef: float = 0.0  # k3 KL to a frozen reference (teacher.path); 0 = none, no reference is loaded
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"  # over the whole step and all ranks
    epochs: int = 1  # optimizer passes over each rollout batch (each pass: the optimizer steps of the step)

    def __post_init__(self) -> None:
        if self.clip_low <= 0 or self.clip_low >= 1 or self.clip_high <= 0 or self.eps <= 0:
            raise ValueError("grpo: 0 < clip_low < 1, clip_high > 0 and eps > 0 required")
        if self.kl_coef < 0 or self.epochs < 1:
            raise ValueError("grpo: kl_coef >= 0 and epochs >= 1 required")


@dataclass
class LossConfig:
    kl_type: KLType = "mixed"  # forward | reverse | mixed | jsd (losses.py); reference default: mixed
    mixed_kl_weight: float = 0.5  # weight of the forward term in "mixed"
    jsd_beta: float = 0.5  # jsd mixture weight
    top_k: int | None = 64  # teacher support (renormalised top-k, reference); null = full vocabulary
    temperature: float = 1.0  # applied to BOTH student and teacher logits (reference flaw §7.20)
    clip_per_entry: float | None = None  # clamp each vocabulary entry's term to <= c (OPSD); null = off
    clip_per_token: float | None = None  # clamp each token's divergence to <= c (verl); null = off
    keep_first_copy_eos: bool = False  # True = reference: teacher sees "...y<eos>\n\nP_r\n\ny"
    chunk_size: int = 1024  # student target positions per lm_head chunk in the loss

    def __post_init__(self) -> None:
        try:  # Divergence is the one place the divergence options are checked
            Divergence.from_config(self)
        except ValueError as exc:
            raise ValueError(f"loss.{exc}") from exc
        if self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class OptimConfig:
    lr: float = 5e-6  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay (all parameters, as torch AdamW)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 20  # linear warm-up steps, then constant (reference: LinearLR + ConstantLR)
    warmup_start_factor: float = 0.1  # lr multiplier at step 0 (reference 0.1)
    max_grad_norm: float = 1.0  # global L2 clip; <= 0 = off (norm still logged)
    fused: bool = False  # torch's fused AdamW kernel (CUDA and CPU; same update up to rounding)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0 or self.warmup_steps < 0:
            raise ValueError("optim: lr > 0, weight_decay >= 0, eps > 0, warmup_steps >= 0 required")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError("optim.warmup_start_factor must be in (0, 1]")


@dataclass
class RayConfig:
    enabled: bool = True  # false = every actor is a plain object in the driver process (tests, debugging)
    placement: Literal["colocated", "split"] = "colocated"  # colocated: rollout, teacher, learner share GPUs
    num_learners: int = 1  # learner ranks (FSDP2 data parallel); one GPU each when GPUs are used
    num_gpus: int = 0  # GPUs of this run, all nodes together (0 = CPU only); one placement bundle each
    rollout_gpus: float = 1.0  # split placement: GPU share per rollout worker of its own bundle, in (0, 1]
    teacher_gpus: float = 1.0  # split placement: GPU share the teacher takes of its bundle, in (0, 1]
    num_rollout_engines: int = 1  # data-parallel rollout engines (vLLM instances); prompts split across them
    rollout_tp_size: int = 0  # GPUs per rollout engine (vLLM TP size); 0 = backend.tensor_parallel_size
    teacher_bundle: int | None = None  # GPU bundle of the teacher; null = 0 (colocated) / own bundle (split)
    bundle_cpus: float | None = None  # CPUs reserved in each GPU bundle; null = ray.learner_cpus
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = (
        "PACK"  # how Ray spreads the one-GPU bundles over nodes (multi-node: RAY_ADDRESS / ray.address)
    )
    placement_timeout_s: float = 300.0  # seconds to wait for the placement group's GPUs before failing
    learner_cpus: float = 0.0  # CPUs requested per learner actor (0 fits small CPU machines)
    cpu_threads: int = (
        0  # CPU runs: torch/OpenMP threads in the teacher and learner actors; 0 = Ray's default (1)
    )
    address: str | None = None  # null = RAY_ADDRESS from the environment or a new local cluster
    master_port: int | None = None  # torch.distributed rendezvous port; null = a free one on rank 0's node
    weight_sync: Literal["memory", "file"] = (
        "memory"  # learner -> rollout engines: tensors (Ray object store / direct) or a safetensors dir
    )

    def __post_init__(self) -> None:
        if self.num_learners < 1 or self.num_gpus < 0 or self.learner_cpus < 0:
            raise ValueError("ray.num_learners >= 1, ray.num_gpus >= 0 and ray.learner_cpus >= 0 required")
        # layout checks that need the resolved TP size live in self_distillation/placement.py:plan_bundles
        if self.num_rollout_engines < 1 or self.rollout_tp_size < 0:
            raise ValueError(
                f"ray.num_rollout_engines must be >= 1 and ray.rollout_tp_size >= 0 (0 = backend.tensor_parallel_size), "
                f"got {self.num_rollout_engines} and {self.rollout_tp_size}"
            )
        for key in ("rollout_gpus", "teacher_gpus"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(
                    f"ray.{key} is a share of one GPU bundle and must be in (0, 1], got {getattr(self, key)}; "
                    "more GPUs per rollout engine = ray.rollout_tp_size"
                )
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"ray.placement_strategy: {self.placement_strategy!r} is not a Ray strategy")
        if self.placement_timeout_s <= 0:
            raise ValueError(f"ray.placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.bundle_cpus is not None and self.bundle_cpus < 0:
            raise ValueError(f"ray.bundle_cpus must be null or >= 0, got {self.bundle_cpus}")
        if self.weight_sync not in ("memory", "file"):
            raise ValueError(f"ray.weight_sync must be memory or file, got {self.weight_sync!r}")
        if self.num_gpus > 0:  # one learner rank per GPU bundle: NCCL refuses two ranks on one GPU
            if self.num_learners > self.num_gpus:
                raise ValueError(
                    f"ray.num_learners ({self.num_learners}) > ray.num_gpus ({self.num_gpus}): "
                    "each learner rank needs its own GPU"
                )
            if self.teacher_bundle is not None and not 0 <= self.teacher_bundle < self.num_gpus:
                raise ValueError(
                    f"ray.teacher_bundle must be in [0, ray.num_gpus={self.num_gpus}), got {self.teacher_bundle}"
                )
            if self.bundle_cpus is not None and self.bundle_cpus < self.learner_cpus:
                raise ValueError(
                    f"ray.bundle_cpus ({self.bundle_cpus}) < ray.learner_cpus ({self.learner_cpus}): "
                    "a learner takes its CPUs from its GPU bundle"
                )


@dataclass
class SelfDistillationConfig:
    student: ModelConfig = field(default_factory=ModelConfig)  # the policy pi_theta (dtype: master weights)
    teacher: ModelConfig = field(default_factory=ModelConfig)  # the frozen SRT checkpoint (Phase 1 final/)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # used only when prompt_source=config
    prompt_source: Literal["auto", "config"] = "auto"  # auto: the teacher's sdzero_prompt.json (required)
    teacher_context: TeacherContextName = (
        "self_revision"  # what the teacher reads before y (teacher_context.py)
    )
    reward: RewardName = "ground_truth"  # where r comes from (shared/rewards)
    vote: VoteConfig = field(
        default_factory=VoteConfig
    )  # reward=majority_vote: threshold, ties, trained votes
    objective: ObjectiveName = "distillation"  # what the learner minimises (objectives.py)
    train_data: DatasetConfig = field(default_factory=DatasetConfig)
    val_data: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))  # path "" = none
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=8192))  # rollouts
    backend: BackendConfig = field(default_factory=BackendConfig)
    grading: GradingConfig = field(default_factory=lambda: GradingConfig(num_workers=8))
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters; synced and exported merged
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # objective=grpo
    optim: OptimConfig = field(default_factory=OptimConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output_dir: str = ""  # required: config.yaml, metrics.jsonl, checkpoints/, weights/, final/
    seed: int = 42  # data order, torch, rollout engine seed
    num_prompts_per_step: int = 128  # problems per step
    num_generations_per_prompt: int = 1  # samples per problem
    train_global_batch_size: int = 0  # sequences per optimizer step; 0 = all samples of the step (one step)
    micro_batch_size: int = 1  # sequences per forward per learner rank
    max_num_steps: int = 1000  # training steps
    max_samples: int = 0  # training samples this run may generate (budget.json); 0 = no cap
    max_num_epochs: int = 5  # passes over the training problems
    max_total_sequence_length: int = 8192  # student prompt + response tokens
    max_teacher_tokens: int = 32768  # teacher sequence budget (y is cut in both copies to fit)
    truncated_rollouts: Literal["distill", "drop"] = (
        "distill"  # y cut at max tokens: distil (reference) or skip
    )
    teacher_mode: Literal["frozen", "sync", "ema", "live"] = "frozen"  # frozen | sync | ema | live (below)
    teacher_sync_every: int = 0  # sync: copy the student into the teacher every N steps
    teacher_ema_decay: float = (
        0.0  # ema: after every optimizer step, teacher = d * teacher + (1 - d) * student
    )
    teacher_offload: bool = True  # GPU: move the teacher to CPU between scoring calls (colocated)
    teacher_pack_tokens: int = 0  # teacher: tokens per packed row (sorted, no padding); 0 = padded, 4 a batch
    packing: bool = False  # learner: each micro-batch as one packed row without padding (same loss)
    async_rollouts: int = 0  # 1: the next step's rollouts are sampled during this step's update (1 off-policy)
    val_period: int = 20  # steps between validations; 0 = none (start/end still run when val_data set)
    val_at_start: bool = True  # validate before the first step
    val_at_end: bool = True  # validate after the last step
    val_k: int = 1  # samples per validation problem (avg@k); reference used 8 on AIME
    val_max_samples: int = 512  # cap on validation problems
    save_period: int = 10  # steps between checkpoints (the last step is always saved); 0 = last only
    keep_last: int = 2  # newest checkpoints kept, plus the best by validation accuracy
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # learner: auto = bf16 compute on CUDA
    activation_checkpointing: bool = True  # learner: recompute decoder layers in backward
    compile_backend: str = ""  # learner: torch.compile each decoder layer ("inductor"); "" = off
    health_metrics: bool = True  # learner: gradient noise scale, weights changed, update ratio (health.py)
    dump_every: int = 0  # steps between per-token KL dumps (dumps/step_N.jsonl.gz + .html); 0 = off
    dump_per_reward: int = 4  # samples dumped per reward value (r=0, r=1) at a dump step
    dump_max_tokens: int = 8192  # tokens kept per dumped sample
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    wandb: bool = False  # log to W&B when installed (WANDB_* env vars apply)
    wandb_project: str = "sd-zero"  # W&B project
    tensorboard: bool = False  # write output_dir/tensorboard when installed

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if not self.student.path or not self.teacher.path or not self.train_data.path:
            raise ConfigError("student.path, teacher.path and train_data.path are required")
        if self.async_rollouts not in (0, 1):
            raise ConfigError(f"async_rollouts must be 0 or 1 (steps off-policy), got {self.async_rollouts}")
        positive = (
            "num_prompts_per_step",
            "num_generations_per_prompt",
            "micro_batch_size",
            "max_num_steps",
            "max_num_epochs",
            "val_k",
            "val_max_samples",
            "log_every",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "train_global_batch_size",
            "teacher_pack_tokens",
            "teacher_sync_every",
            "val_period",
            "save_period",
            "keep_last",
            "dump_every",
            "dump_per_reward",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        samples = self.num_prompts_per_step * self.num_generations_per_prompt
        if self.train_global_batch_size and samples % self.train_global_batch_size:
            raise ConfigError(
                f"train_global_batch_size ({self.train_global_batch_size}) must divide the samples per step "
                f"({samples} = num_prompts_per_step x num_generations_per_prompt)"
            )
        if self.max_total_sequence_length < 2 or self.max_teacher_tokens < 3:
            raise ConfigError("max_total_sequence_length >= 2 and max_teacher_tokens >= 3 required")
        self._check_teacher_mode()
        self._check_objective()
        if self.sampling.n != 1:
            raise ConfigError("set num_generations_per_prompt, not sampling.n")
        from self_distillation.teacher_context import CONTEXTS_READING_REWARD

        if self.teacher_context in CONTEXTS_READING_REWARD and self.reward == "none":
            raise ConfigError(
                f"teacher_context={self.teacher_context} reads the reward r (P_r or a correct sibling): "
                "reward=none leaves it undefined"
            )

    def _check_teacher_mode(self) -> None:
        """frozen: never updated (SD-Zero, OPSD's fixed teacher; with LoRA and teacher = student, the base
        weights with the adapter disabled); sync: a hard copy of the student every teacher_sync_every steps
        (the paper's iterative self-evolution); ema: an EMA of the student after every optimizer step
        (float32 shadow); live: the learner's current weights score the teacher sequences (no copy)."""
        mode, every, decay = self.teacher_mode, self.teacher_sync_every, self.teacher_ema_decay
        if not 0 <= decay < 1:
            raise ConfigError(f"teacher_ema_decay must be in [0, 1), got {decay}")
        if mode in ("frozen", "live") and (every or decay):
            raise ConfigError(
                f"teacher_mode={mode} never syncs the teacher: set teacher_mode=sync (teacher_sync_every) or "
                "teacher_mode=ema (teacher_ema_decay)"
            )
        if mode == "sync" and (every < 1 or decay):
            raise ConfigError("teacher_mode=sync needs teacher_sync_every >= 1 (and no teacher_ema_decay)")
        if mode == "ema":
            if not 0 < decay < 1 or every:
                raise ConfigError(
                    "teacher_mode=ema needs 0 < teacher_ema_decay < 1 (and no teacher_sync_every)"
                )
            if self.optimizer_steps_per_step != 1:
                raise ConfigError(
                    "teacher_mode=ema updates the teacher after every optimizer step, which the teacher sees as "
                    "the step's final weights: use one optimizer step per step (train_global_batch_size=0)"
                )

    def _check_objective(self) -> None:
        if self.objective != "grpo":
            if self.teacher_context == "none":
                raise ConfigError("teacher_context=none: only objective=grpo reads no teacher")
            return
        if self.teacher_context != "none":
            raise ConfigError("objective=grpo reads no teacher context: set teacher_context=none")
        if self.reward == "none" or self.num_generations_per_prompt < 2:
            raise ConfigError("objective=grpo needs a reward and num_generations_per_prompt >= 2 (a group)")
        if self.sampling.temperature != 1.0 or self.loss.temperature != 1.0:
            raise ConfigError(
                "objective=grpo takes its ratio against the rollout engine's log-probs, which are of the "
                "untempered distribution: sampling.temperature and loss.temperature must be 1.0"
            )
        if self.teacher_mode != "frozen":
            raise ConfigError("objective=grpo: the KL reference (grpo.kl_coef > 0) is a frozen teacher")

    @property
    def teacher_source(self) -> Literal["actor", "learner", "none"]:
        """Who scores the teacher sequences: a teacher actor with its own weights, the learner (live; or
        frozen LoRA with teacher = student: the base weights with the adapter disabled, no second copy), or
        nobody (GRPO without a KL reference)."""
        if self.objective == "grpo":
            return "actor" if self.grpo.kl_coef > 0 else "none"
        same = self.teacher.path == self.student.path
        return (
            "learner"
            if self.teacher_mode == "live" or (self.lora.enabled and same and self.teacher_mode == "frozen")
            else "actor"
        )

    @property
    def samples_per_step(self) -> int:
        return self.num_prompts_per_step * self.num_generations_per_prompt

    @property
    def optimizer_steps_per_step(self) -> int:
        return (
            1 if not self.train_global_batch_size else self.samples_per_step // self.train_global_batch_size
        )
