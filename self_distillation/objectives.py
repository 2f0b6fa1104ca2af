"""The objective seam: what the Phase-2 learner minimises, chosen by name (`objective` in the config).

An objective turns one micro-batch of `LearnerSample`s into (the sum of its per-token loss terms, the
detached per-token values its statistics need) through the student's target positions only
(`target_logits.TargetLogitsLM`); the learner normalises by the step's global token count
(`training.run_optimizer_step`), accumulates the statistics per sample and all-reduces them. The loop
and the learner never branch on the objective.

    distillation  the masked token-level divergence against the teacher's top-k (or full) log-probs
                  (paper Sec. 3.2; `losses.Divergence`): SD-Zero, OPSD and every teacher context
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from self_distillation.losses import Divergence, compute_sparse_token_divergence, count_divergence_terms
from self_distillation.rollout_data import LearnerSample, collate_sequences
from self_distillation.step_metrics import DistillationStats
from self_revision_training.shared.target_logits import TargetLogitsLM, upcast_logits

OBJECTIVE_NAMES: tuple[str, ...] = ("distillation",)


class Objective(Protocol):
    name: str
    needs_teacher: bool  # the driver scores the samples with the teacher first

    def micro_batch_loss(
        self, model: TargetLogitsLM, samples: list[LearnerSample], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """-> (sum of the per-token loss terms with grad, detached per-token values for the statistics)."""
        ...

    def new_stats(self) -> Any: ...

    def add_stats(self, stats: Any, samples: list[LearnerSample], values: dict[str, Any]) -> None: ...


def student_batch(samples: list[LearnerSample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The right-padded student batch; an empty list is a dummy micro-batch without targets (ranks must
    run the same number of forwards)."""
    if samples:
        batch = collate_sequences([(s.student_ids, s.student_mask) for s in samples], pad_id)
    else:
        batch = collate_sequences([([0, 0], [0, 0])], 0)
    return {key: v.to(device) for key, v in batch.items()}


def _distillation_terms(
    rows: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    div: Divergence,
) -> tuple[torch.Tensor, ...]:
    logits = upcast_logits(lm_head(rows))  # [C, V]
    token = compute_sparse_token_divergence(logits, teacher_logprobs, teacher_ids, div)  # [C]
    with torch.no_grad():  # statistics only (raw distribution of the sampled token)
        student_target_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # [C]
    return token.values, student_target_logprobs, token.clipped_entries, token.clipped_token


class DistillationObjective:
    """Token-level divergence to the teacher's distribution on every target token (SD-Zero, OPSD)."""

    name = "distillation"
    needs_teacher = True

    def __init__(self, div: Divergence, vocab_size: int):
        self.div = div
        self.vocab_size = vocab_size

    def _teacher_rows(self, samples: list[LearnerSample]) -> tuple[torch.Tensor, torch.Tensor | None]:
        full = self.div.top_k is None or (samples and samples[0].teacher["ids"] is None)
        if samples:
            logprobs = torch.cat([s.teacher["logprobs"] for s in samples])
            ids = None if full else torch.cat([s.teacher["ids"] for s in samples]).long()
            return logprobs, ids
        width = self.vocab_size if full else self.div.top_k
        return torch.zeros(0, width), None if full else torch.zeros(0, width, dtype=torch.long)

    def micro_batch_loss(
        self, model: TargetLogitsLM, samples: list[LearnerSample], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = student_batch(samples, pad_id, device)
        teacher_logprobs, teacher_ids = self._teacher_rows(samples)
        next_mask = batch["target_mask"][:, 1:].bool()  # [B, T-1]: position t predicts token t + 1
        if int(next_mask.sum()) != teacher_logprobs.shape[0]:
            raise ValueError(
                f"{int(next_mask.sum())} student targets but {teacher_logprobs.shape[0]} teacher rows"
            )
        chunks, anchor = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["position_ids"],
            next_mask,
            _distillation_terms,
            per_row=(teacher_logprobs.to(device), None if teacher_ids is None else teacher_ids.to(device)),
            extra=(self.div,),
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


def build_objective(name: str, div: Divergence, vocab_size: int) -> Objective:
    """The objective `name` (OBJECTIVE_NAMES)."""
    if name == "distillation":
        return DistillationObjective(div, vocab_size)
    raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVE_NAMES)}")
