"""The objective seam: what the Phase-2 learner minimises, chosen by name (`objective` in the config).

An objective turns one micro-batch of `LearnerSample`s into (the sum of its per-token loss terms, the
detached per-token values its statistics need) through the student's target positions only
(`target_logits.TargetLogitsLM`); the learner normalises by the step's global token count
(`training.run_optimizer_step`), accumulates the statistics per sample and all-reduces them. The loop
and the learner never branch on the objective.

    grpo          the PPO-clipped policy gradient with group-normalised advantages against the rollout
                  engine's log-probs (`grpo.py`), no teacher: the paper's RL baseline
    distillation  the masked token-level divergence against the teacher's distribution (paper Sec. 3.2;
                  `losses.Divergence`): SD-Zero, OPSD and every teacher context. Top-k: against the
                  teacher's top-k log-probs. Full vocabulary (top_k=None): the teacher's logits are computed
                  here, chunk by chunk, from its hidden states at the target positions and its lm_head
                  (`set_teacher_lm_head`), so no [N, V] teacher tensor is ever sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from self_distillation.grpo import (
    aggregation_weights,
    compute_group_advantages,
    compute_policy_terms,
    unit_count,
)
from self_distillation.losses import (
    Divergence,
    TokenDivergence,
    compute_sparse_token_divergence,
    compute_token_divergence_stats,
    count_divergence_terms,
)
from self_distillation.rollout_data import LearnerSample, collate_sequences
from self_distillation.step_metrics import DistillationStats, PolicyStats
from self_revision_training.shared.target_logits import TargetLogitsLM, upcast_logits

OBJECTIVE_NAMES: tuple[str, ...] = ("distillation", "grpo")


class Objective(Protocol):
    name: str
    needs_teacher: bool  # the driver scores the samples with the teacher first

    def count(self, samples: list[LearnerSample]) -> list[float]:
        """[loss units of these samples]: the step's normaliser is their sum over micro-batches and ranks."""
        ...

    def micro_batch_loss(
        self, model: TargetLogitsLM, samples: list[LearnerSample], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """-> (sum of the per-token loss terms with grad, detached per-token values for the statistics)."""
        ...

    def new_stats(self) -> Any: ...

    def add_stats(self, stats: Any, samples: list[LearnerSample], values: dict[str, Any]) -> None: ...


def student_batch(
    samples: list[LearnerSample], pad_id: int, device: torch.device, packing: bool = False
) -> dict[str, torch.Tensor]:
    """The right-padded student batch, or (packing) one packed row without padding
    (`rollout_data.collate_sequences`); an empty list is a dummy micro-batch without targets (ranks must
    run the same number of forwards)."""
    if samples:
        batch = collate_sequences([(s.student_ids, s.student_mask) for s in samples], pad_id, packing)
    else:
        batch = collate_sequences([([0, 0], [0, 0])], 0, packing)
    return {key: v.to(device) for key, v in batch.items()}


def _terms(logits: torch.Tensor, targets: torch.Tensor, token: TokenDivergence) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():  # statistics only (raw distribution of the sampled token)
        student_target_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # [C]
    return token.values, student_target_logprobs, token.clipped_entries, token.clipped_token


def _distillation_terms(
    rows: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    div: Divergence,
) -> tuple[torch.Tensor, ...]:
    """Against the teacher's top-k log-probs (already at the temperature) shipped by the teacher."""
    logits = upcast_logits(lm_head(rows))  # [C, V]
    return _terms(
        logits, targets, compute_sparse_token_divergence(logits, teacher_logprobs, teacher_ids, div)
    )


def _full_vocabulary_terms(
    rows: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    div: Divergence,
) -> tuple[torch.Tensor, ...]:
    """Against the teacher's full distribution, its logits computed here for this chunk only (teacher_weight
    None: the teacher is this model itself, scored by the learner; its lm_head, detached)."""
    logits = upcast_logits(lm_head(rows))  # [C, V]
    with torch.no_grad():
        weight = lm_head.weight.detach() if teacher_weight is None else teacher_weight
        teacher_logits = upcast_logits(teacher_hidden @ weight.T)  # [C, V], as the teacher's lm_head
    return _terms(logits, targets, compute_token_divergence_stats(logits, teacher_logits, div))


class DistillationObjective:
    """Token-level divergence to the teacher's distribution on every target token (SD-Zero, OPSD)."""

    name = "distillation"
    needs_teacher = True

    def __init__(self, div: Divergence, vocab_size: int, packing: bool = False):
        self.div = div
        self.vocab_size = vocab_size
        self.packing = packing  # micro-batches as one packed row (student_batch)
        self.teacher_weight: torch.Tensor | None = None  # [V, H_T]: full vocabulary only
        self.own_teacher_head = False  # the learner scores the teacher itself: its own lm_head, detached

    def count(self, samples: list[LearnerSample]) -> list[float]:
        return [float(sum(s.num_targets for s in samples))]  # token mean over the whole step

    def set_teacher_lm_head(self, weight: torch.Tensor | None) -> None:
        """The teacher's lm_head for full-vocabulary logits; None = the learner's own (learner-scored)."""
        self.teacher_weight, self.own_teacher_head = weight, weight is None

    def _teacher_rows(self, samples: list[LearnerSample], device: torch.device) -> tuple[Any, tuple]:
        """(chunk function, per-row teacher tensors, extra arguments) of this micro-batch."""
        if self.div.top_k is None:
            if self.teacher_weight is None and not self.own_teacher_head:
                raise RuntimeError(
                    "full-vocabulary distillation needs the teacher's lm_head: set_teacher_lm_head"
                )
            hidden = torch.cat([s.teacher["hidden"] for s in samples]) if samples else torch.zeros(0, 0)
            return _full_vocabulary_terms, (hidden.to(device),), (self.teacher_weight, self.div)
        if samples:
            logprobs = torch.cat([s.teacher["logprobs"] for s in samples])
            ids = torch.cat([s.teacher["ids"] for s in samples]).long()
        else:
            logprobs, ids = torch.zeros(0, self.div.top_k), torch.zeros(0, self.div.top_k, dtype=torch.long)
        return _distillation_terms, (logprobs.to(device), ids.to(device)), (self.div,)

    def micro_batch_loss(
        self, model: TargetLogitsLM, samples: list[LearnerSample], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = student_batch(samples, pad_id, device, self.packing)
        chunk_fn, per_row, extra = self._teacher_rows(samples, device)
        next_mask = batch["target_mask"][:, 1:].bool()  # [B, T-1]: position t predicts token t + 1
        if int(next_mask.sum()) != per_row[0].shape[0]:
            raise ValueError(f"{int(next_mask.sum())} student targets but {per_row[0].shape[0]} teacher rows")
        chunks, anchor = model(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["position_ids"],
            next_mask,
            chunk_fn,
            per_row,
            extra,
        )
        if anchor is not None:  # no target: a zero loss still connected to the graph (ranks run backward)
            empty = torch.zeros(0, device=device)
            return anchor, {"divergence": empty, "logprobs": empty, "entries": empty, "token": empty}
        divergence = torch.cat([c[0] for c in chunks])
        values = {
            "divergence": divergence.detach(),
            "logprobs": torch.cat([c[1].detach() for c in chunks]),
            "entries": torch.cat([c[2].detach() for c in chunks]),
            "token": torch.cat([c[3].detach() for c in chunks]),
        }
        return divergence.sum(), values

    def new_stats(self) -> DistillationStats:
        return DistillationStats()

    def add_stats(
        self, stats: DistillationStats, samples: list[LearnerSample], values: dict[str, Any]
    ) -> None:
        support = self.vocab_size if self.div.top_k is None else min(self.div.top_k, self.vocab_size)
        entries_per_token = support * count_divergence_terms(self.div)
        offset = 0
        for s in samples:
            n = s.num_targets
            part = {k: v[offset : offset + n].cpu() for k, v in values.items()}
            offset += n
            stats.add_sample(
                s.reward,
                part["divergence"],
                part["logprobs"],
                s.teacher["target_logprobs"],
                s.rollout_logprobs,
                part["entries"],
                part["token"],
                entries_per_token,
            )


@dataclass(frozen=True)
class PolicyOptions:
    clip_low: float
    clip_high: float
    kl_coef: float
    temperature: float


def _policy_terms(
    rows: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    options: PolicyOptions,
) -> tuple[torch.Tensor, ...]:
    logits = upcast_logits(lm_head(rows))  # [C, V]
    if options.temperature != 1.0:
        logits = logits / options.temperature
    logp_all = logits.log_softmax(-1)
    logprobs = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # [C]
    terms = compute_policy_terms(
        logprobs,
        old_logprobs,
        advantages,
        clip_low=options.clip_low,
        clip_high=options.clip_high,
        ref_logprobs=ref_logprobs,
        kl_coef=options.kl_coef,
    )
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return terms.values * weights, terms.ratio, terms.clipped, terms.kl, entropy, logprobs.detach()


class GRPOObjective:
    """The PPO-clipped policy gradient with group-normalised advantages (`grpo.py`); no teacher."""

    name = "grpo"
    needs_teacher = False

    def __init__(self, cfg: Any, temperature: float, packing: bool = False):
        self.cfg = cfg  # SelfDistillationConfig.grpo
        self.packing = packing  # micro-batches as one packed row (student_batch)
        self.options = PolicyOptions(cfg.clip_low, cfg.clip_high, cfg.kl_coef, temperature)

    def count(self, samples: list[LearnerSample]) -> list[float]:
        return [unit_count([s.num_targets for s in samples], self.cfg.aggregation)]

    def micro_batch_loss(
        self, model: TargetLogitsLM, samples: list[LearnerSample], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = student_batch(samples, pad_id, device, self.packing)
        next_mask = batch["target_mask"][:, 1:].bool()
        lengths = [s.num_targets for s in samples]
        weights = aggregation_weights(lengths, self.cfg.aggregation)

        def per_token(values: list[list[float]]) -> torch.Tensor:
            return torch.tensor([v for row in values for v in row], dtype=torch.float64, device=device)

        if any(s.rollout_logprobs is None or len(s.rollout_logprobs) != s.num_targets for s in samples):
            raise ValueError("GRPO needs the rollout engine's log-prob of every sampled token")
        old = per_token([s.rollout_logprobs for s in samples])
        adv = per_token([[s.advantage] * n for s, n in zip(samples, lengths, strict=True)])
        w = per_token([[wt] * n for wt, n in zip(weights, lengths, strict=True)])
        ref = (
            per_token([s.teacher["target_logprobs"].tolist() for s in samples]) if self.cfg.kl_coef else None
        )
        chunks, anchor = model(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["position_ids"],
            next_mask,
            _policy_terms,
            (old, adv, w, ref),
            (self.options,),
        )
        if anchor is not None:
            empty = torch.zeros(0, device=device)
            return anchor, {k: empty for k in ("terms", "ratio", "clipped", "kl", "entropy", "logprobs")}
        terms = torch.cat([c[0] for c in chunks])
        names = ("ratio", "clipped", "kl", "entropy", "logprobs")
        values = {name: torch.cat([c[i + 1].detach() for c in chunks]) for i, name in enumerate(names)}
        return terms.sum(), {"terms": terms.detach(), **values}

    def new_stats(self) -> PolicyStats:
        return PolicyStats()

    def add_stats(self, stats: PolicyStats, samples: list[LearnerSample], values: dict[str, Any]) -> None:
        offset = 0
        for s in samples:
            n = s.num_targets
            stats.add_sample({k: v[offset : offset + n].cpu() for k, v in values.items()}, s.rollout_logprobs)
            offset += n


@dataclass(frozen=True)
class RolloutSelection:
    """The driver side of an objective for one step: which prompts train, and per-sample advantages."""

    keep: list[bool]  # per prompt
    advantages: list[list[float]] | None  # per kept prompt, per sample (policy-gradient objectives)
    metrics: dict[str, float]


def select_rollouts(name: str, grpo: Any, rewards: list[list[float]]) -> RolloutSelection:
    """Distillation trains on every prompt; GRPO computes group advantages and skips (and counts) the
    groups whose rewards are all equal."""
    if name != "grpo":
        return RolloutSelection([True] * len(rewards), None, {})
    groups = compute_group_advantages(rewards, grpo.scale_rewards, grpo.eps)
    kept = [a for a, zero in zip(groups.advantages, groups.zero_variance, strict=True) if not zero]
    flat = [a for row in kept for a in row]
    mean = sum(flat) / len(flat) if flat else float("nan")
    metrics = {
        "train/zero_variance_groups": float(sum(groups.zero_variance)),
        "train/advantage_mean": mean,
        "train/advantage_std": (sum((a - mean) ** 2 for a in flat) / len(flat)) ** 0.5
        if flat
        else float("nan"),
        "train/advantage_min": min(flat, default=float("nan")),
        "train/advantage_max": max(flat, default=float("nan")),
    }
    return RolloutSelection([not z for z in groups.zero_variance], kept, metrics)


def build_objective(
    name: str, div: Divergence, vocab_size: int, grpo: Any = None, packing: bool = False
) -> Objective:
    """The objective `name` (OBJECTIVE_NAMES); `grpo` = the config's grpo section; `packing` = each
    micro-batch is one packed row without padding (same loss and gradients as the padded batch)."""
    if name == "distillation":
        return DistillationObjective(div, vocab_size, packing)
    if name == "grpo":
        return GRPOObjective(grpo, div.temperature, packing)
    raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVE_NAMES)}")
