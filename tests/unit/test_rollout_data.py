"""Phase-2 core: sparse (top-k / full) loss vs brute force, data order, rollout items, batching, retention."""

from __future__ import annotations

import pytest
import torch

from self_distillation.losses import Divergence, compute_sparse_token_divergence, distillation_loss
from self_distillation.rollout_data import (
    DataPosition,
    build_rollout_items,
    collate_sequences,
    epoch_order,
    plan_micro_batches,
    take_problem_indices,
)
from self_distillation.step_metrics import DistillationStats
from self_distillation.teacher_context import SelfRevisionContext
from self_revision_training.shared.checkpoints import select_checkpoints_to_delete
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards import Verdict


def sd_zero_items(
    prompts,
    samples,
    rewards,
    phrases,
    *,
    problem_indices,
    eos_token_ids,
    max_teacher_tokens,
    drop_truncated=False,
):
    """build_rollout_items with SD-Zero's self-revision context (the default teacher context)."""
    by_index = dict(zip(problem_indices, prompts, strict=True))
    context = SelfRevisionContext(
        lambda p: by_index[p.index],
        phrases,
        eos_token_ids=eos_token_ids,
        max_teacher_tokens=max_teacher_tokens,
    )
    problems = [Problem(index=i, problem=f"p{i}", answer="1") for i in problem_indices]
    rows = [[(ids, "", finish, lp) for ids, finish, lp in row] for row in samples]
    verdicts = [[Verdict(r, None, "correct" if r else "wrong") for r in row] for row in rewards]
    return build_rollout_items(context, problems, prompts, rows, verdicts, drop_truncated=drop_truncated)


@pytest.mark.parametrize("kl_type", ["forward", "reverse", "mixed", "jsd"])
@pytest.mark.parametrize("top_k", [None, 1, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sparse_divergence_matches_full_logit_loss(kl_type, top_k, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 23, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(7, 23, generator=g, dtype=torch.float64) * 2
    scaled = (teacher / temperature).log_softmax(-1)
    if top_k is None:
        ids, lps = None, scaled
    else:
        lps, ids = scaled.topk(top_k, dim=-1)
    sparse = compute_sparse_token_divergence(
        student, lps, ids, Divergence(kl_type, temperature=temperature)
    ).values
    mask = torch.ones(1, 7)
    ref, _ = distillation_loss(
        student[None], teacher[None], mask, Divergence(kl_type, top_k=top_k, temperature=temperature)
    )
    assert sparse.mean().item() == pytest.approx(ref.item(), abs=1e-10)
    (g1,) = torch.autograd.grad(sparse.mean(), student)
    (g2,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g1, g2)


def test_sparse_divergence_is_zero_when_equal_and_teacher_gets_no_grad():
    logits = torch.randn(4, 11)
    teacher_lp = logits.log_softmax(-1).requires_grad_(True)
    lps, ids = teacher_lp.topk(3, dim=-1)
    student = logits.clone().requires_grad_(True)
    div = compute_sparse_token_divergence(student, lps, ids, Divergence("mixed")).values
    assert div.abs().max() < 1e-6
    div.sum().backward()
    assert teacher_lp.grad is None and student.grad is not None


def test_epoch_order_is_seeded_and_positions_advance_and_drop_last():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    pos, seen = DataPosition(), []
    for _ in range(3):
        idx, pos = take_problem_indices(pos, 10, 4, seed=1, max_epochs=2)
        seen.append(idx)
    assert sorted(seen[0] + seen[1]) == sorted(epoch_order(10, 1, 0)[:8])
    assert (pos.epoch, pos.offset) == (1, 4) and seen[2] == epoch_order(10, 1, 1)[:4]
    assert take_problem_indices(DataPosition(1, 8), 10, 4, seed=1, max_epochs=2) is None


def test_build_rollout_items_picks_phrase_by_reward_and_skips_bad_samples():
    eos = frozenset({99})
    phrases = {True: [7, 1, 7], False: [7, 0, 7]}
    samples = [[([5, 6, 99], "stop", [-0.1, -0.2, -0.3]), ([], "stop", [])], [([5] * 10, "length", None)]]
    items, skipped = sd_zero_items(
        [[1, 2], [3]],
        samples,
        [[True, False], [False]],
        phrases,
        problem_indices=[10, 11],
        eos_token_ids=eos,
        max_teacher_tokens=100,
    )
    assert skipped == {"empty_response": 1, "no_teacher_budget": 0, "truncated_rollout": 0}
    first = items[0]
    assert first.teacher_ids == [1, 2, 5, 6, 7, 1, 7, 5, 6, 99]  # first copy without EOS, P_1 block
    assert first.teacher_mask == [0] * 7 + [1] * 3 and first.student_mask == [0, 0, 1, 1, 1]
    assert items[1].teacher_ids[11:14] == [7, 0, 7] and items[1].problem_index == 11
    _, skipped = sd_zero_items(
        [[1, 2]],
        [[([5, 6], "stop", None)]],
        [[True]],
        phrases,
        problem_indices=[0],
        eos_token_ids=eos,
        max_teacher_tokens=6,
    )
    assert skipped["no_teacher_budget"] == 1


def test_truncated_rollouts_are_distilled_or_dropped_and_counted():
    phrases = {True: [7, 1, 7], False: [7, 0, 7]}
    samples = [[([5, 6, 99], "stop", None), ([5] * 10, "length", None)]]
    kwargs = {"problem_indices": [0], "eos_token_ids": frozenset({99}), "max_teacher_tokens": None}
    items, skipped = sd_zero_items([[1, 2]], samples, [[True, False]], phrases, **kwargs)
    assert [i.finish_reason for i in items] == ["stop", "length"] and skipped["truncated_rollout"] == 0
    items, skipped = sd_zero_items([[1, 2]], samples, [[True, False]], phrases, drop_truncated=True, **kwargs)
    assert [i.finish_reason for i in items] == ["stop"] and skipped["truncated_rollout"] == 1


def test_collate_and_plan_give_every_rank_the_same_number_of_micro_batches():
    batch = collate_sequences([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["target_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    plan = plan_micro_batches([5, 3, 9, 4, 2], world_size=2, micro_batch_size=2, optimizer_steps=1)
    assert len(plan) == 1 and len(plan[0][0]) == len(plan[0][1])
    assert sorted(i for rank in plan[0] for mb in rank for i in mb) == [0, 1, 2, 3, 4]
    plan = plan_micro_batches([1] * 4, world_size=3, micro_batch_size=1, optimizer_steps=2)
    assert [sorted(i for r in step for mb in r for i in mb) for step in plan] == [[0, 1], [2, 3]]
    assert all(len(r) == 1 for step in plan for r in step)  # the third rank gets a dummy


def test_checkpoint_retention_keeps_latest_and_best():
    assert select_checkpoints_to_delete([1, 2, 3, 4], {2: 0.9, 4: 0.5}, keep_last=1) == [1, 3]
    assert select_checkpoints_to_delete([1, 2], {}, keep_last=0) == []


def test_learner_metrics_split_kl_by_reward():
    stats = DistillationStats()
    one = torch.ones(1)
    stats.add_sample(
        True, torch.tensor([0.25, 0.75]), torch.zeros(2), torch.zeros(2), None, 0 * one, 0 * one, 4
    )
    stats.add_sample(False, torch.tensor([2.0]), torch.zeros(1), torch.full((1,), 0.3), None, one, one, 4)
    m = stats.metrics()
    assert (m["train/kl"], m["train/kl_r1"], m["train/kl_r0"]) == (1.0, 0.5, 2.0)
    assert m["train/teacher_minus_student_logprob"] == pytest.approx(0.1)
    assert m["train/clipped_entry_fraction"] == 1 / 12 and m["train/clipped_token_fraction"] == 1 / 3
    again = DistillationStats()
    again.set_from_tensor(stats.to_tensor("sum"), "sum")
    again.set_from_tensor(stats.to_tensor("max"), "max")
    assert again == stats
