"""From graded on-policy rollouts to learner batches, and the per-step metrics (paper Sec. 3.2, Phase 2).

Pure Python/torch, no Ray or vLLM. One step of `self_distillation.train`:

    indices, position = take_problem_indices(position, ...)         # seeded order per epoch
    items, skipped = build_rollout_items(context, problems, prompts, samples, verdicts)
    plan = plan_micro_batches([len(i.student_ids) for i in items], world, micro_batch_size, steps)
    batch = collate_sequences([(i.student_ids, i.student_mask) for i in chunk], pad_id)

Each item holds the aligned student sequence chat(x)+y and the teacher sequence the teacher context
builds (SD-Zero's default: chat(x)+y+P_r-block+y, P_r chosen by the reward r). Empty samples and samples
the context cannot build (no teacher budget, ...) are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from self_distillation.teacher_context import GroupSample, TeacherContext
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards import Verdict
from self_revision_training.shared.target_logits import packed_position_ids


@dataclass
class RolloutItem:
    problem_index: int  # dataset row of the problem
    reward: bool  # r: the response was graded correct
    student_ids: list[int]  # chat(x) + y
    student_mask: list[int]  # 1 on y (targets)
    teacher_ids: list[int]  # chat(x) + y' + P_r block + y
    teacher_mask: list[int]  # 1 on the second copy of y
    rollout_logprobs: list[float] | None  # engine log-probs of y's tokens (raw distribution)
    finish_reason: str  # stop | length (length = hit the sampling budget)
    budget_truncated: bool  # y was cut to fit max_teacher_tokens
    policy_version: int = 0  # rollout engine weights version that sampled y
    context_info: dict[str, float] = field(default_factory=dict)  # per-sample facts of the teacher context
    advantage: float | None = None  # policy-gradient objectives (GRPO)

    @property
    def num_targets(self) -> int:
        return sum(self.student_mask)


@dataclass
class LearnerSample:
    """One sample as the learner sees it: the student sequence, its reward and the objective's inputs."""

    student_ids: list[int]  # chat(x) + y
    student_mask: list[int]  # 1 on y (targets)
    reward: bool  # r
    rollout_logprobs: list[float] | None  # engine log-probs of y's tokens (raw distribution)
    teacher: dict[str, Any] | None = None  # Teacher.score output for this sample (distillation)
    teacher_ids: list[int] | None = None  # the teacher sequence, when the learner scores it itself
    teacher_mask: list[int] | None = None
    advantage: float | None = None  # policy-gradient objectives (GRPO): the sample's advantage

    @property
    def num_targets(self) -> int:
        return sum(self.student_mask)


@dataclass
class DataPosition:
    epoch: int = 0  # 0-based pass over the training problems
    offset: int = 0  # problems of this epoch's order already used


def epoch_order(num_problems: int, seed: int, epoch: int) -> list[int]:
    """The problems' order in `epoch`: a seeded shuffle, identical on every restart."""
    order = list(range(num_problems))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def take_problem_indices(
    position: DataPosition, num_problems: int, count: int, seed: int, max_epochs: int
) -> tuple[list[int], DataPosition] | None:
    """The next `count` problem indices and the position after them; None when the epochs are used up.

    A remainder shorter than `count` is dropped (reference: drop_last=True) and the next epoch starts.
    """
    if count > num_problems:
        raise ValueError(f"{count} prompts per step but only {num_problems} training problems")
    epoch, offset = position.epoch, position.offset
    if offset + count > num_problems:
        epoch, offset = epoch + 1, 0
    if epoch >= max_epochs:
        return None
    order = epoch_order(num_problems, seed, epoch)
    return order[offset : offset + count], DataPosition(epoch, offset + count)


def build_rollout_items(
    context: TeacherContext,
    problems: list[Problem],
    prompt_ids: list[list[int]],
    samples: list[list[tuple[list[int], str, str, list[float] | None]]],
    verdicts: list[list[Verdict]],
    *,
    policy_version: int = 0,
    drop_truncated: bool = False,
    advantages: list[list[float]] | None = None,
) -> tuple[list[RolloutItem], dict[str, int]]:
    """Student/teacher pairs for every usable sample, from the teacher context.

    Args:
        problems: per prompt, its problem; prompt_ids: per prompt, the student's chat(x) token ids.
        samples: per prompt, per sample (token ids of y, text, finish reason, engine log-probs or None).
        verdicts: per prompt, per sample, the reward source's verdict.
        drop_truncated: skip samples cut at the sampling budget (finish reason "length"; counted as
            truncated_rollout) instead of distilling them (a cut y is usually graded r=0 for lack of an answer).
        advantages: per prompt, per sample, a policy-gradient objective's advantage (GRPO), or None.
    Returns:
        (items, skipped counts by reason; empty_response, no_teacher_budget, truncated_rollout always present)
    """
    items: list[RolloutItem] = []
    skipped = {"empty_response": 0, "no_teacher_budget": 0, "truncated_rollout": 0}
    advantages = advantages or [[None] * len(row) for row in samples]
    for problem, prompt, row, row_verdicts, row_adv in zip(
        problems, prompt_ids, samples, verdicts, advantages, strict=True
    ):
        group = [GroupSample(ids, text, v) for (ids, text, _, _), v in zip(row, row_verdicts, strict=True)]
        for (token_ids, _, finish_reason, logprobs), verdict, advantage in zip(
            row, row_verdicts, row_adv, strict=True
        ):
            if verdict.skip is not None:  # no usable r (e.g. a tied vote): never distil it with a made-up cue
                skipped[verdict.skip] = skipped.get(verdict.skip, 0) + 1
                continue
            if drop_truncated and finish_reason == "length" and token_ids:
                skipped["truncated_rollout"] += 1
                continue
            result = context.build(problem, prompt, token_ids, verdict, group)
            if result.pair is None:
                reason = result.skip_reason or "no_teacher_budget"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            pair, kept = result.pair, len(result.pair.response_ids)
            items.append(
                RolloutItem(
                    problem_index=problem.index,
                    reward=bool(verdict.correct),
                    student_ids=pair.student.input_ids,
                    student_mask=pair.student.target_mask,
                    teacher_ids=pair.teacher.input_ids,
                    teacher_mask=pair.teacher.target_mask,
                    rollout_logprobs=None if logprobs is None else list(logprobs[:kept]),
                    finish_reason=finish_reason,
                    budget_truncated=pair.truncated,
                    policy_version=policy_version,
                    context_info=dict(result.info),
                    advantage=advantage,
                )
            )
    return items, skipped


def collate_sequences(
    sequences: list[tuple[list[int], list[int]]], pad_id: int, packed: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded batch, or one packed row without padding.

    Args:
        sequences: (input ids, target mask) pairs.
        packed: concatenate the sequences into one row ([1, sum of lengths]) with position ids restarting
            at 0 for each sequence and no attention_mask: transformers then keeps each sequence's attention
            inside it (`target_logits.packed_position_ids`). Targets keep their order (sequence by
            sequence), so `select_target_rows` returns the same rows as from the padded batch.
    Returns:
        input_ids [B, T] int64, attention_mask [B, T] {0,1} (padded only), position_ids [B, T],
        target_mask [B, T] {0,1} (1 on target tokens; position t - 1 predicts a target at t).
    """
    for row, (ids, mask) in enumerate(sequences):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {row}: {len(ids)} ids but {len(mask)} mask values")
        if mask and mask[0]:  # also what keeps a packed row's targets inside their own sequence
            raise ValueError("a target at position 0 has no preceding position to predict it")
    if packed:
        return {
            "input_ids": torch.tensor([[t for ids, _ in sequences for t in ids]], dtype=torch.long),
            "position_ids": packed_position_ids([len(ids) for ids, _ in sequences]),
            "target_mask": torch.tensor([[m for _, mask in sequences for m in mask]], dtype=torch.long),
        }
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        target_mask[row, : len(ids)] = torch.tensor(mask)
    position_ids = torch.arange(width).expand(len(sequences), -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "target_mask": target_mask,
    }


def plan_micro_batches(
    lengths: list[int], world_size: int, micro_batch_size: int, optimizer_steps: int
) -> list[list[list[list[int]]]]:
    """Assign items to optimizer steps, ranks and micro-batches.

    Items are split into `optimizer_steps` consecutive groups (in order); within a group they are sorted
    by length (less padding) and dealt round-robin to ranks, then cut into micro-batches. Every rank gets
    the same number of micro-batches (FSDP collectives must match): an empty list is a dummy micro-batch
    that contributes nothing.
    Returns:
        plan[step][rank] = list of micro-batches, each a list of item indices.
    """
    if world_size < 1 or micro_batch_size < 1 or optimizer_steps < 1:
        raise ValueError("world_size, micro_batch_size and optimizer_steps must be >= 1")
    n = len(lengths)
    bounds = [round(s * n / optimizer_steps) for s in range(optimizer_steps + 1)]
    plan = []
    for s in range(optimizer_steps):
        group = sorted(range(bounds[s], bounds[s + 1]), key=lambda i: (lengths[i], i))
        per_rank = [group[r::world_size] for r in range(world_size)]
        chunks = [
            [idx[i : i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)] for idx in per_rank
        ]
        depth = max(1, max(len(c) for c in chunks))
        plan.append([c + [[] for _ in range(depth - len(c))] for c in chunks])
    return plan
