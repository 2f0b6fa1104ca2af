"""GRPO (Shao et al. 2024) as a Phase-2 objective: group-normalised advantages and the PPO-clipped surrogate.

Pure Python/torch. For a prompt's G samples with rewards r_1..r_G:

    A_i = (r_i - mean(r)) / (std(r) + eps)      scale_rewards="group" (GRPO)
    A_i =  r_i - mean(r)                        scale_rewards="none"  (Dr. GRPO drops the std)

(std is the population standard deviation over the group); a group whose rewards are all equal carries no
signal (every A_i = 0) and is skipped and counted. Per token t of sample i, with the ratio
rho = exp(log pi_theta(y_t) - log pi_old(y_t)) against the rollout engine's sampled-token log-probs:

    term = -min(rho * A_i, clip(rho, 1 - clip_low, 1 + clip_high) * A_i)   (DAPO: separate low / high clips)
         + kl_coef * (exp(ref - logp) - (ref - logp) - 1)                  (k3 estimator of KL(pi_theta || ref))

Aggregation: `token_mean` sums the terms of the whole step and divides by its tokens (all micro-batches,
all ranks, as the distillation loss); `sequence_mean` averages each sequence's terms, then divides by the
step's sequences (the learner's normaliser is then the sequence count: `unit_count`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token_mean", "sequence_mean"]


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: list[list[float]]  # per prompt, per sample
    zero_variance: list[bool]  # per prompt: every reward equal (skipped: no signal)


def compute_group_advantages(
    rewards: list[list[float]], scale_rewards: Literal["group", "none"] = "group", eps: float = 1e-6
) -> GroupAdvantages:
    """Group-normalised advantages of each prompt's samples (module docstring)."""
    advantages, zero = [], []
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        flat = all(r == group[0] for r in group)
        zero.append(flat)
        if flat:
            advantages.append([0.0] * len(group))
        elif scale_rewards == "group":
            advantages.append([(r - mean) / (std + eps) for r in group])
        else:
            advantages.append([r - mean for r in group])
    return GroupAdvantages(advantages, zero)


@dataclass(frozen=True)
class PolicyTerms:
    values: torch.Tensor  # [C] loss term per token (before aggregation weights)
    ratio: torch.Tensor  # [C] rho, detached
    clipped: torch.Tensor  # [C] 1 where the clipped branch is the one taken (no gradient through rho)
    kl: torch.Tensor  # [C] k3 estimate per token (0 without a reference), detached


def compute_policy_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyTerms:
    """The clipped surrogate (+ k3 KL) per token.

    Args:
        logprobs: [C] log pi_theta of the sampled tokens (gradients flow).
        old_logprobs: [C] the rollout engine's log-probs of the same tokens.
        advantages: [C] each token's sequence advantage.
        ref_logprobs: [C] the reference model's log-probs, when kl_coef > 0.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    values = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(values)
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probs")
        delta = ref_logprobs.detach() - logprobs
        kl_terms = torch.exp(delta) - delta - 1.0
        values = values + kl_coef * kl_terms
        kl = kl_terms.detach()
    took_clip = (clipped < unclipped).to(values.dtype).detach()
    return PolicyTerms(values, ratio.detach(), took_clip, kl)


def aggregation_weights(lengths: list[int], aggregation: Aggregation) -> list[float]:
    """Per-sequence weight on its token terms: 1 (token mean) or 1 / length (sequence mean)."""
    return [1.0 if aggregation == "token_mean" else 1.0 / max(1, n) for n in lengths]


def unit_count(lengths: list[int], aggregation: Aggregation) -> float:
    """The loss units of these sequences: their tokens (token mean) or their number (sequence mean)."""
    return float(sum(lengths)) if aggregation == "token_mean" else float(sum(1 for n in lengths if n))
