"""The optimizer step every trainer shares: the FSDP2 global-token-mean step, LR multipliers, model loading.

One step over this rank's micro-batches (`run_optimizer_step`):

    count   = all_reduce(sum of the micro-batches' loss units)   # before any backward: the step's normaliser
    scale   = world_size / count                                 # FSDP2 averages gradients over ranks
    for each micro-batch: (loss_sum * scale * weight).backward() # loss_sum = the micro-batch's summed terms
    clip the global gradient norm, optimizer.step(), zero_grad

so the step's gradient is that of the mean over every unit (token, for SFT and distillation) of the whole
step, whatever the split over micro-batches and ranks (reference §7.15). A micro-batch of weight 0 is a
dummy that keeps every rank's collective calls in step and contributes nothing. Used by the SFT
(`sft.py`) and the Phase-2 learner (`self_distillation.learner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from self_revision_training.shared import distributed as dist_utils
from self_revision_training.shared.config import ModelConfig
from self_revision_training.shared.health import (
    GradientNoiseScale,
    compute_grad_sq_norm,
    compute_unit_mean_sq_norm,
    compute_weight_change,
    snapshot_params,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, auto: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a config name ("auto" or None -> `auto`)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return auto
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or auto")
    return DTYPES[name]


def load_causal_lm(model: ModelConfig, dtype: torch.dtype, **kwargs: Any):
    """A Hugging Face causal LM from `model.path` in `dtype`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model.path, dtype=dtype, trust_remote_code=model.trust_remote_code, **kwargs
    )


def warmup_multiplier(
    step: int, warmup_steps: int, start_factor: float = 0.0, then: Callable[[int], float] | None = None
) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warm-up from `start_factor` to 1 over
    `warmup_steps`, then `then(step)` (default: constant 1)."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    return 1.0 if then is None else then(step)


def build_lr_lambda(
    schedule: str, total_steps: int, warmup_steps: int, start_factor: float = 0.0, final_factor: float = 0.0
):
    """HF-style schedule: warm-up from `start_factor`, then constant, linear or cosine decay to
    `final_factor` (0 = HF's decay to 0; SSD decays 5e-6 -> 1e-6, final_factor 0.2)."""

    def decay(step: int) -> float:
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            shape = max(0.0, 1.0 - progress)
        else:
            shape = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return final_factor + (1.0 - final_factor) * shape

    return lambda step: warmup_multiplier(step, warmup_steps, start_factor, decay)


@dataclass
class MicroBatch:
    inputs: Any  # what `forward` takes
    weight: float = 1.0  # 0 = dummy filler (same collectives, no contribution)


@dataclass
class HealthProbe:
    """Training-health metrics of every optimizer step (`health.py`): the two-batch gradient noise scale
    (small batch = the first micro-batch of every rank, big batch = the whole step, in sequences) and the
    fraction of weights changed in the forward dtype with the update-to-weight norm ratio."""

    noise: GradientNoiseScale = field(default_factory=GradientNoiseScale)  # EMA state (checkpoint it)
    forward_dtype: torch.dtype | None = None  # the dtype the forward computes in (bf16 mixed precision)
    num_sequences: Callable[[Any], float] = len  # real sequences of a micro-batch's inputs


@dataclass
class StepResult:
    loss: float  # the step's loss: summed terms / the global count of loss units
    grad_norm: float  # global L2 norm before clipping
    counts: list[float]  # the all-reduced counts (counts[0] = the loss units)
    outputs: list[Any]  # forward's second return value per micro-batch (detached statistics)
    health: dict[str, float] = field(default_factory=dict)  # HealthProbe metrics (empty without one)


def run_optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    *,
    forward: Callable[[Any], tuple[torch.Tensor, Any]],
    count: Callable[[Any], Sequence[float]],
    max_grad_norm: float,
    device: torch.device,
    health: HealthProbe | None = None,
) -> StepResult:
    """One optimizer step over this rank's micro-batches with the global-unit-mean normalisation.

    Args:
        forward: inputs -> (loss_sum: scalar tensor with grad, per-micro-batch output kept for the caller).
        count: inputs -> [loss units, other counters...] of that micro-batch (summed over micro-batches and
            all-reduced over ranks before any backward; only counts[0] normalises the loss).
        max_grad_norm: global L2 clip; <= 0 = no clipping (the norm is still computed).
        health: compute the training-health metrics of this step (read-only: the update is unchanged).
    """
    world = dist_utils.world_size()
    per_batch = [[float(v) * mb.weight for v in count(mb.inputs)] for mb in micro_batches]
    local = [sum(column) for column in zip(*per_batch, strict=True)]
    counts = dist_utils.all_reduce(torch.tensor(local, dtype=torch.float64, device=device))
    global_units = max(float(counts[0]), 1.0)
    scale = world / global_units  # FSDP2 averages gradients over ranks; x world undoes it
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    outputs, small_sq = [], None
    for k, mb in enumerate(micro_batches):
        micro_loss, output = forward(mb.inputs)
        (micro_loss * (scale * mb.weight)).backward()
        loss_sum += micro_loss.detach().double() * mb.weight
        outputs.append(output)
        if health is not None and k == 0:  # the small batch of the noise scale: every rank's first one
            small_sq = compute_grad_sq_norm(model.parameters(), dist_utils.all_reduce)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    trained = [p for p in model.parameters() if p.requires_grad]
    before = snapshot_params(trained, health.forward_dtype) if health is not None else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(dist_utils.all_reduce(loss_sum)) / global_units
    metrics = {}
    if health is not None:
        sequences = [float(health.num_sequences(mb.inputs)) * mb.weight for mb in micro_batches]
        n_first, n_all = dist_utils.all_reduce(
            torch.tensor([sequences[0], sum(sequences)], dtype=torch.float64, device=device)
        ).tolist()
        if 0 < n_first < n_all:  # one micro-batch per rank: the two batches coincide, no estimate
            unit = 1.0 / global_units  # the loss is normalised by the step's units: .grad = unit * sum
            metrics |= health.noise.update(
                compute_unit_mean_sq_norm(small_sq, n_first, unit),
                compute_unit_mean_sq_norm(float(grad_norm) ** 2, n_all, unit),
                n_first,
                n_all,
            )
        metrics |= compute_weight_change(trained, before, dist_utils.all_reduce).as_metrics()
    return StepResult(loss, float(grad_norm), [float(c) for c in counts], outputs, metrics)
