"""From graded on-policy rollouts to learner batches, and the per-step metrics (paper Sec. 3.2, Phase 2).

Pure Python/torch, no Ray or vLLM. One step of `self_distillation.train`:

    indices, position = take_problem_indices(position, ...)         # seeded order per epoch
    items, skipped = build_rollout_items(prompts, samples, rewards, phrase_ids, ...)
    plan = plan_micro_batches([len(i.student_ids) for i in items], world, micro_batch_size, steps)
    batch = collate_sequences([(i.student_ids, i.student_mask) for i in chunk], pad_id)

Each item holds the aligned student sequence chat(x)+y and teacher sequence chat(x)+y+P_r-block+y
(`sequences.build_teacher_sequence`); P_r is chosen by the binary reward r. Empty samples and samples
that leave no teacher budget are skipped and counted, never fatal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from self_distillation.sequences import build_teacher_sequence


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
    prompt_ids: list[list[int]],
    samples: list[list[tuple[list[int], str, list[float] | None]]],
    rewards: list[list[bool]],
    phrase_ids: dict[bool, list[int]],
    *,
    problem_indices: list[int],
    eos_token_ids: frozenset[int],
    max_teacher_tokens: int | None,
    keep_first_copy_eos: bool = False,
    policy_version: int = 0,
) -> tuple[list[RolloutItem], dict[str, int]]:
    """Student/teacher pairs for every usable sample.

    Args:
        prompt_ids: per problem, chat(x) token ids.
        samples: per problem, per sample (token ids of y, finish reason, engine log-probs or None).
        rewards: per problem, per sample r.
        phrase_ids: {True: ids of delimiter+P_1+delimiter, False: ids of delimiter+P_0+delimiter}.
    Returns:
        (items, skipped counts by reason: empty_response, no_teacher_budget)
    """
    items: list[RolloutItem] = []
    skipped = {"empty_response": 0, "no_teacher_budget": 0}
    for p, (prompt, row, row_rewards) in enumerate(zip(prompt_ids, samples, rewards, strict=True)):
        for (token_ids, finish_reason, logprobs), reward in zip(row, row_rewards, strict=True):
            if not token_ids:
                skipped["empty_response"] += 1
                continue
            pair = build_teacher_sequence(
                prompt,
                token_ids,
                phrase_ids[bool(reward)],
                eos_token_ids=eos_token_ids,
                keep_first_copy_eos=keep_first_copy_eos,
                max_teacher_tokens=max_teacher_tokens,
            )
            if pair is None:
                skipped["no_teacher_budget"] += 1
                continue
            kept = len(pair.response_ids)
            items.append(
                RolloutItem(
                    problem_index=problem_indices[p],
                    reward=bool(reward),
                    student_ids=pair.student.input_ids,
                    student_mask=pair.student.target_mask,
                    teacher_ids=pair.teacher.input_ids,
                    teacher_mask=pair.teacher.target_mask,
                    rollout_logprobs=None if logprobs is None else list(logprobs[:kept]),
                    finish_reason=finish_reason,
                    budget_truncated=pair.truncated,
                    policy_version=policy_version,
                )
            )
    return items, skipped


def collate_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Args:
        sequences: (input ids, target mask) pairs.
    Returns:
        input_ids [B, T] int64, attention_mask [B, T] {0,1}, position_ids [B, T], target_mask [B, T] {0,1}
        (1 on target tokens; position t - 1 predicts a target at t).
    """
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {row}: {len(ids)} ids but {len(mask)} mask values")
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        target_mask[row, : len(ids)] = torch.tensor(mask)
    if bool(target_mask[:, 0].any()):
        raise ValueError("a target at position 0 has no preceding position to predict it")
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


@dataclass
class StepStats:
    """Per-step rollout statistics (the learner's loss/KL metrics are merged in by the driver)."""

    rewards: list[bool] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)


def compute_rollout_metrics(
    stats: StepStats, items: list[RolloutItem], skipped: dict[str, int]
) -> dict[str, float]:
    """Training reward, r=1 fraction, response lengths, truncation and skip counts of one step."""
    n = max(1, len(stats.rewards))
    lengths = stats.response_lengths or [0]
    return {
        "train/reward": sum(stats.rewards) / n,  # accuracy of the sampled responses
        "train/fraction_r1": sum(i.reward for i in items) / max(1, len(items)),  # among distilled items
        "train/response_length_mean": sum(lengths) / len(lengths),
        "train/response_length_max": float(max(lengths)),
        "train/truncation_rate": sum(r == "length" for r in stats.finish_reasons) / n,
        "train/teacher_budget_truncation_rate": sum(i.budget_truncated for i in items) / max(1, len(items)),
        "train/num_samples": float(len(stats.rewards)),
        "train/num_items": float(len(items)),
        **{f"train/skipped_{k}": float(v) for k, v in skipped.items()},
    }


def compute_learner_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Token means from the learner's summed statistics (keys as produced by `Learner.train_step`)."""
    out = {}
    tokens = max(totals.get("num_tokens", 0.0), 1.0)
    for r in (1, 0):
        count = totals.get(f"num_tokens_r{r}", 0.0)
        out[f"train/kl_r{r}"] = totals.get(f"kl_sum_r{r}", 0.0) / count if count else float("nan")
    out["train/kl"] = totals.get("kl_sum", 0.0) / tokens
    out["train/teacher_minus_student_logprob"] = totals.get("logprob_gap_sum", 0.0) / tokens
    rollout_tokens = totals.get("rollout_tokens", 0.0)
    out["train/rollout_minus_learner_logprob_abs_mean"] = (
        totals.get("rollout_logprob_abs_diff_sum", 0.0) / rollout_tokens if rollout_tokens else float("nan")
    )
    out["train/rollout_minus_learner_logprob_abs_max"] = totals.get(
        "rollout_logprob_abs_diff_max", float("nan")
    )
    return out


def select_checkpoints_to_delete(
    steps: list[int], val_accuracy: dict[int, float], keep_last: int
) -> list[int]:
    """Checkpoint steps to delete: all but the newest `keep_last` and the best by validation accuracy."""
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set(steps)
    scored = [s for s in steps if s in val_accuracy]
    if scored:
        keep.add(max(scored, key=lambda s: (val_accuracy[s], s)))
    return [s for s in steps if s not in keep]
