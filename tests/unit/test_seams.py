"""Each seam's default implementation reproduces the pre-seam pipeline exactly: the self-revision teacher
context (ids and masks), the teacher prompt, the ground-truth reward source (verdicts), the divergence
options object and the distillation objective (loss values and gradients)."""

from __future__ import annotations

import random

import pytest
import torch

from self_distillation.config import LossConfig
from self_distillation.losses import Divergence, distillation_loss
from self_distillation.objectives import build_objective
from self_distillation.rollout_data import LearnerSample
from self_distillation.teacher_context import SelfRevisionContext, build_teacher_context
from self_revision_training.shared.config import GradingConfig, PromptConfig, TeacherPromptConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.prompts import (
    build_generation_prompt,
    build_phrase_block,
    build_teacher_prompt,
    encode_text,
    fill_template,
)
from self_revision_training.shared.rewards import Verdict, build_reward_source
from self_revision_training.shared.rewards.math_verify import MathGrader
from self_revision_training.shared.target_logits import TargetLogitsLM


def reference_teacher_sequence(prompt, response, phrase, eos, keep_eos, budget):
    """The pre-seam `build_teacher_sequence` (main @ 7c150e5), written out: (teacher ids, mask, student ids)."""
    if not response:
        return None
    if budget is not None:
        extra = 0 if keep_eos or response[-1] not in eos else -1
        if len(prompt) + 2 * len(response) + extra + len(phrase) > budget:
            allowance = (budget - len(prompt) - len(phrase)) // 2
            if allowance < 1:
                return None
            response = response[:allowance]
    first = response if keep_eos or not response or response[-1] not in eos else response[:-1]
    context = prompt + first + phrase
    return context + response, [0] * len(context) + [1] * len(response), prompt + response


@pytest.mark.parametrize("keep_eos", [False, True])
def test_self_revision_context_equals_the_pre_seam_sequences(keep_eos):
    rng = random.Random(0)
    eos = frozenset({99})
    phrases = {True: [7, 1, 7], False: [7, 0, 7]}
    for _ in range(300):
        prompt = [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        response = [rng.randint(1, 50) for _ in range(rng.randint(0, 8))] + (
            [99] if rng.random() < 0.5 else []
        )
        budget = rng.choice([None, 8, 12, 20, 40])
        correct = rng.random() < 0.5
        context = SelfRevisionContext(
            lambda p, ids=prompt: ids,
            phrases,
            eos_token_ids=eos,
            keep_first_copy_eos=keep_eos,
            max_teacher_tokens=budget,
        )
        result = context.build(Problem(0, "x", "1"), prompt, response, Verdict(correct, None, ""), [])
        ref = reference_teacher_sequence(prompt, response, phrases[correct], eos, keep_eos, budget)
        if ref is None:
            assert result.pair is None
            assert result.skip_reason == ("empty_response" if not response else "no_teacher_budget")
            continue
        assert (
            result.pair.teacher.input_ids,
            result.pair.teacher.target_mask,
            result.pair.student.input_ids,
        ) == ref


def test_the_teacher_prompt_defaults_to_the_students_and_can_differ(qwen_tokenizer):
    cfg = PromptConfig()
    problem = r"Compute $\frac{1}{2} + {x}$ where {solution} is literal."
    student = build_generation_prompt(qwen_tokenizer, problem, cfg)
    assert build_teacher_prompt(qwen_tokenizer, problem, cfg) == student
    teacher_cfg = PromptConfig(
        teacher=TeacherPromptConfig(
            user_template="{problem}\n\nReference:\n{solution}\n\n{instruction}", assistant_prefix="<think>\n"
        )
    )
    teacher = build_teacher_prompt(qwen_tokenizer, problem, teacher_cfg, solution=r"\boxed{1}")
    expected_user = problem + "\n\nReference:\n\\boxed{1}\n\n" + cfg.instruction
    assert teacher.text == (
        f"<|im_start|>user\n{expected_user}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )  # braces in the problem and the solution survive; the prefix follows the assistant marker
    assert qwen_tokenizer.decode(teacher.ids) == teacher.text
    with pytest.raises(ValueError, match="solution"):
        fill_template("{problem} {solution}", problem="x")
    # the self-revision context reads the teacher's own prompt; the student keeps its own
    ids = encode_text(qwen_tokenizer, "So \\boxed{1}.") + [qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    context = build_teacher_context(
        "self_revision", qwen_tokenizer, teacher_cfg, eos_token_ids=frozenset({ids[-1]})
    )
    solved = Problem(0, problem, "1", solution=r"\boxed{1}")
    pair = context.build(solved, student.ids, ids, Verdict(False, "1", "wrong"), []).pair
    assert pair.student.input_ids == student.ids + ids
    assert pair.teacher.input_ids[: len(teacher.ids)] == teacher.ids
    assert qwen_tokenizer.decode(pair.teacher.input_ids) == (
        teacher.text + "So \\boxed{1}." + build_phrase_block(False, cfg) + "So \\boxed{1}.<|im_end|>"
    )


def test_ground_truth_reward_equals_the_per_response_verifier():
    problems = [Problem(0, "a", "4"), Problem(1, "b", r"\frac{1}{2}")]
    groups = [[r"so \boxed{4}", "", r"\boxed{5}"], [r"\boxed{0.5}", "no answer", "   "]]
    with build_reward_source("ground_truth", "math", GradingConfig(num_workers=1)) as reward:
        verdicts = reward.score(problems, groups)
    with MathGrader(GradingConfig(num_workers=1)) as grader:
        for problem, group, row in zip(problems, groups, verdicts, strict=True):
            for text, verdict in zip(group, row, strict=True):
                if not text.strip():  # empty: r=0 without a verifier call (as Phase 2's verifier did)
                    assert verdict == Verdict(False, None, "empty_response", problem.answer)
                    continue
                ref = grader.grade(text, problem.answer)
                assert verdict == Verdict(ref.correct, ref.extracted, ref.reason, problem.answer)
    assert [[v.correct for v in row] for row in verdicts] == [[True, False, False], [True, False, False]]
    with build_reward_source("none", "math", GradingConfig()) as none:
        assert none.score(problems[:1], [["x"]]) == [[Verdict(False, None, "no_reward")]]
    with pytest.raises(ValueError, match="groups"):
        none.score(problems, [["x"]])


def test_divergence_from_the_config_carries_every_loss_option():
    loss = LossConfig(kl_type="forward", top_k=5, temperature=1.1, clip_per_entry=0.05, clip_per_token=2.0)
    assert Divergence.from_config(loss) == Divergence("forward", 0.5, 0.5, 5, 0.05, 2.0, 1.1)
    with pytest.raises(ValueError, match="clip_per_entry"):
        LossConfig(kl_type="jsd", clip_per_entry=0.1)


@pytest.mark.parametrize("top_k", [1, 6])  # full vocabulary: tests/unit/test_full_vocabulary.py
def test_distillation_objective_equals_the_dense_reference(tiny_model_dir, top_k):
    """Through the learner's own path (target positions, chunked lm_head, teacher top-k rows), the loss
    sum and the student gradients equal the dense full-logit reference on the same sequences."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    div = Divergence("mixed", top_k=top_k, temperature=0.9)
    seqs = [([3, 4, 5, 6, 7, 8], [0, 0, 1, 1, 1, 1]), ([9, 10, 11], [0, 1, 1])]
    samples = []
    for ids, mask in seqs:
        with torch.no_grad():
            logits = (
                teacher(torch.tensor([ids])).logits[0, :-1][torch.tensor(mask[1:]).bool()] / div.temperature
            )
        lp = logits.log_softmax(-1)
        values, top = lp.topk(top_k, -1)
        samples.append(
            LearnerSample(ids, mask, True, None, {"ids": top, "logprobs": values, "target_logprobs": None})
        )
    objective = build_objective("distillation", div, student.config.vocab_size)
    model = TargetLogitsLM(student, chunk_size=2)
    loss_sum, values = objective.micro_batch_loss(model, samples, 0, torch.device("cpu"))
    grads = torch.autograd.grad(loss_sum, list(student.parameters()))
    total = 0.0
    for ids, mask in seqs:  # dense reference, one unpadded sequence at a time
        s_logits = student(torch.tensor([ids])).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(torch.tensor([ids])).logits[:, :-1]
        loss, metrics = distillation_loss(s_logits, t_logits, torch.tensor([mask[1:]]).double(), div)
        total = total + loss * metrics["num_tokens"]
    ref_grads = torch.autograd.grad(total, list(student.parameters()))
    torch.testing.assert_close(loss_sum, total, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert values["divergence"].shape == (6,)


def test_lr_schedules_decay_to_the_final_factor_and_zero_is_unchanged():
    import math

    from self_revision_training.shared.training import build_lr_lambda

    plain, floor = build_lr_lambda("cosine", 10, 2), build_lr_lambda("cosine", 10, 2, final_factor=0.2)
    for step in range(11):
        progress = max(0.0, (step - 2) / 8)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if step >= 2 else None
        if shape is not None:
            assert plain(step) == shape  # final_factor 0: HF's cosine exactly
            assert floor(step) == pytest.approx(0.2 + 0.8 * shape)
    assert floor(10) == pytest.approx(0.2) and build_lr_lambda("linear", 10, 0, final_factor=0.2)(10) == pytest.approx(0.2)
