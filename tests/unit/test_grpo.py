"""GRPO: advantages, the clipped surrogate and both aggregations against a float64 brute force written from
the definitions; identical rewards give zero gradient; at ratio 1 the gradient is REINFORCE with the group
baseline (through the learner's own objective path on a tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from self_distillation.config import GRPOConfig
from self_distillation.grpo import compute_group_advantages
from self_distillation.objectives import GRPOObjective, select_rollouts
from self_distillation.rollout_data import LearnerSample
from self_revision_training.shared.target_logits import TargetLogitsLM


def test_group_advantages_by_hand():
    adv = compute_group_advantages([[1, 0, 0, 1], [1, 1, 1], [0, 0, 1]], "group", eps=0.0)
    assert adv.advantages[0] == [1.0, -1.0, -1.0, 1.0]  # mean 0.5, population std 0.5
    assert adv.zero_variance == [False, True, False] and adv.advantages[1] == [0.0, 0.0, 0.0]
    std = math.sqrt(2 / 9)
    assert adv.advantages[2] == pytest.approx([-1 / 3 / std, -1 / 3 / std, 2 / 3 / std])
    dr = compute_group_advantages([[0, 0, 1]], "none")
    assert dr.advantages[0] == pytest.approx([-1 / 3, -1 / 3, 2 / 3])
    selection = select_rollouts("grpo", GRPOConfig(), [[1, 0], [1, 1], [0, 0]])
    assert selection.keep == [True, False, False] and selection.metrics["train/zero_variance_groups"] == 2.0
    assert select_rollouts("distillation", GRPOConfig(), [[1, 1]]).advantages is None


def brute_force(logprobs_new, logprobs_old, advantages, lengths, clip_low, clip_high, aggregation):
    """Per sequence, per token: -min(rho A, clip(rho) A); token mean or sequence mean, in float64."""
    total, units, t = 0.0, 0.0, 0
    for i, n in enumerate(lengths):
        seq = 0.0
        for _ in range(n):
            rho = torch.exp(logprobs_new[t] - logprobs_old[t])
            a = advantages[i]
            term = -torch.minimum(rho * a, torch.clamp(rho, 1 - clip_low, 1 + clip_high) * a)
            seq = seq + term
            t += 1
        if aggregation == "token_mean":
            total, units = total + seq, units + n
        else:
            total, units = total + seq / n, units + 1
    return total / units


def _samples(ids, lengths, advantages, old):
    out, t = [], 0
    for seq, n, a in zip(ids, lengths, advantages, strict=True):
        prompt = len(seq) - n
        out.append(
            LearnerSample(seq, [0] * prompt + [1] * n, a > 0, old[t : t + n].tolist(), None, advantage=a)
        )
        t += n
    return out


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_loss_and_gradient_equal_the_brute_force(tiny_model_dir, aggregation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    ids = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16, 17]]
    lengths = [4, 2, 3]
    advantages = [1.3, -0.7, 0.0]  # the third: a zero-advantage sample contributes nothing
    with torch.no_grad():  # behaviour log-probs: shifted so some ratios are clipped, some not
        logits = [model(torch.tensor([s])).logits[0, -n - 1 : -1] for s, n in zip(ids, lengths, strict=True)]
        current = torch.cat(
            [
                lg.log_softmax(-1).gather(-1, torch.tensor(s[-n:])[:, None])[:, 0]
                for lg, s, n in zip(logits, ids, lengths, strict=True)
            ]
        )
    old = current + torch.tensor([0.5, -0.5, 0.01, -0.01, 0.4, -0.3, 0.0, 0.9, -0.9], dtype=torch.float64)
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.28, aggregation=aggregation)
    objective = GRPOObjective(cfg, temperature=1.0)
    samples = _samples(ids, lengths, advantages, old)
    loss_sum, values = objective.micro_batch_loss(TargetLogitsLM(model, 4), samples, 0, torch.device("cpu"))
    loss = loss_sum / objective.count(samples)[0]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    new = torch.cat(
        [
            model(torch.tensor([s]))
            .logits[0, -n - 1 : -1]
            .log_softmax(-1)
            .gather(-1, torch.tensor(s[-n:])[:, None])[:, 0]
            for s, n in zip(ids, lengths, strict=True)
        ]
    )
    ref = brute_force(new, old, advantages, lengths, 0.2, 0.28, aggregation)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    clipped = values["clipped"]
    assert 0 < float(clipped.sum()) < clipped.numel()  # both branches were exercised


def test_identical_rewards_give_zero_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    adv = compute_group_advantages([[1.0, 1.0, 1.0]]).advantages[0]
    samples = _samples(
        [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]], [2, 2, 3], adv, torch.zeros(7, dtype=torch.float64)
    )
    loss, _ = GRPOObjective(GRPOConfig(), 1.0).micro_batch_loss(
        TargetLogitsLM(model), samples, 0, torch.device("cpu")
    )
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_at_ratio_one_the_gradient_is_reinforce_with_the_group_baseline(tiny_model_dir):
    """Fresh rollouts, one optimizer step: old log-probs = the current ones, rho = 1 and no clipping, so
    grad = -(1/N) sum_i A_i sum_t grad log pi(y_t) with A_i the group-normalised reward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    ids = [[3, 4, 5, 6, 7], [3, 4, 8, 9, 10], [3, 4, 11, 12, 13], [3, 4, 14, 15, 16]]
    lengths, rewards = [3, 3, 3, 3], [1.0, 0.0, 1.0, 0.0]
    adv = compute_group_advantages([rewards]).advantages[0]

    def logprobs():
        return [
            model(torch.tensor([s]))
            .logits[0, -n - 1 : -1]
            .log_softmax(-1)
            .gather(-1, torch.tensor(s[-n:])[:, None])[:, 0]
            for s, n in zip(ids, lengths, strict=True)
        ]

    with torch.no_grad():
        old = torch.cat(logprobs())
    samples = _samples(ids, lengths, adv, old)
    objective = GRPOObjective(GRPOConfig(), 1.0)
    loss_sum, values = objective.micro_batch_loss(TargetLogitsLM(model), samples, 0, torch.device("cpu"))
    assert (
        torch.allclose(values["ratio"], torch.ones(12, dtype=torch.float64)) and not values["clipped"].any()
    )
    grads = torch.autograd.grad(loss_sum / objective.count(samples)[0], list(model.parameters()))
    reinforce = -sum(a * lp.sum() for a, lp in zip(adv, logprobs(), strict=True)) / sum(lengths)
    ref_grads = torch.autograd.grad(reinforce, list(model.parameters()))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
