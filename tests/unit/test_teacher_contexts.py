"""Teacher contexts beyond SD-Zero: OPSD's reference solution, revision with solution, SDPO's successful
sibling. Golden prompt text; null-context identity (teacher = student weights and template -> loss 0 and
gradients 0, float64); the teacher log-probs equal a plain forward of each unpadded teacher sequence; the
solution (never the template) is cut to fit the budget; siblings and missing solutions are counted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from self_distillation.losses import Divergence
from self_distillation.objectives import build_objective
from self_distillation.rollout_data import LearnerSample, build_rollout_items
from self_distillation.teacher import Teacher
from self_distillation.teacher_context import TEACHER_CONTEXTS, GroupSample, build_teacher_context
from self_revision_training.shared.config import ModelConfig, PromptConfig, TeacherPromptConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.prompts import (
    TEMPLATES,
    build_generation_prompt,
    build_teacher_prompt,
    encode_text,
)
from self_revision_training.shared.rewards import Verdict
from self_revision_training.shared.target_logits import TargetLogitsLM

SOLUTION = r"Use $\{a, b\}$ and {x}: $2 + 2 = 4$, so \boxed{4}."
OPSD_CFG = PromptConfig(user_template="opsd_student", teacher=TeacherPromptConfig(user_template="opsd"))


def test_opsd_teacher_prompt_is_the_template_byte_for_byte(qwen_tokenizer):
    problem = r"What is $\frac{8}{2}$? Give {one} answer."
    teacher = build_teacher_prompt(qwen_tokenizer, problem, OPSD_CFG, solution=SOLUTION)
    expected_user = (
        f"Problem: {problem}\n\nHere is a reference solution to this problem:\n"
        f"=== Reference Solution Begin ===\n{SOLUTION}\n=== Reference Solution End ===\n"
        "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind "
        "each step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, "
        "derive the same final answer to the problem above. Think step by step, explore different approaches, "
        "and don't be afraid to backtrack or reconsider if something doesn't work out:\n"
        "\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert teacher.text == f"<|im_start|>user\n{expected_user}<|im_end|>\n<|im_start|>assistant\n"
    assert qwen_tokenizer.decode(teacher.ids) == teacher.text
    student = build_generation_prompt(qwen_tokenizer, problem, OPSD_CFG)
    assert student.text == (
        f"<|im_start|>user\nProblem: {problem}\n\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    first = dataclasses.replace(OPSD_CFG, teacher=TeacherPromptConfig(user_template="opsd_first_release"))
    text = build_teacher_prompt(qwen_tokenizer, problem, first, solution=SOLUTION).text
    assert text.startswith(
        f"<|im_start|>user\n{problem}\n\nHere is a reference solution to this problem:\n{SOLUTION}\n"
    )
    assert "now articulate your own step-by-step reasoning" in text and TEMPLATES["opsd_first_release"]


def _group(tokenizer, texts, correct):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [
        GroupSample(encode_text(tokenizer, t) + [eos], t, Verdict(c, None, "correct" if c else "wrong"))
        for t, c in zip(texts, correct, strict=True)
    ]


def _items(context_name, tokenizer, prompt_cfg, group, budget=None, problem=None):
    problem = problem or Problem(3, "What is 2 + 2?", "4", solution=SOLUTION)
    context = build_teacher_context(
        context_name,
        tokenizer,
        prompt_cfg,
        eos_token_ids=frozenset({group[0].response_ids[-1]}),
        max_teacher_tokens=budget,
    )
    prompt = build_generation_prompt(tokenizer, problem.problem, prompt_cfg).ids
    samples = [[(g.response_ids, g.text, "stop", None) for g in group]]
    return build_rollout_items(context, [problem], [prompt], samples, [[g.verdict for g in group]])


def test_solution_is_cut_to_fit_and_counted_never_the_template(qwen_tokenizer):
    group = _group(qwen_tokenizer, ["So the answer is \\boxed{4}."], [True])
    (full,), _ = _items("reference_solution", qwen_tokenizer, OPSD_CFG, group)
    assert full.context_info == {"privileged": 1.0, "privileged_truncated": 0.0}
    budget = len(full.teacher_ids) - 6
    (cut,), _ = _items("reference_solution", qwen_tokenizer, OPSD_CFG, group, budget=budget)
    text = qwen_tokenizer.decode(cut.teacher_ids)
    assert len(cut.teacher_ids) <= budget and cut.context_info["privileged_truncated"] == 1.0
    assert "=== Reference Solution End ===" in text and "\\boxed{}." in text  # the template survives
    assert SOLUTION not in text and SOLUTION[:10] in text  # only the solution was cut
    _, skipped = _items("reference_solution", qwen_tokenizer, OPSD_CFG, group, problem=Problem(1, "x", "4"))
    assert skipped["no_solution"] == 1


def test_successful_sibling_demonstrates_another_correct_sample(qwen_tokenizer):
    texts = ["wrong: \\boxed{5}.", "right: \\boxed{4}.", "also wrong \\boxed{3}."]
    items, skipped = _items(
        "successful_sibling",
        qwen_tokenizer,
        PromptConfig(),
        _group(qwen_tokenizer, texts, [False, True, False]),
    )
    assert skipped["no_successful_sibling"] == 1  # the only correct sample has no OTHER correct sibling
    assert len(items) == 2
    for item in items:
        decoded = qwen_tokenizer.decode(item.teacher_ids)
        assert (
            "Correct solution:\n\nright: \\boxed{4}.\n\n\n\nCorrectly solve the original question.\n"
            in decoded
        )


def test_revision_with_solution_has_the_solution_and_the_cue(qwen_tokenizer):
    group = _group(qwen_tokenizer, ["So \\boxed{5}."], [False])
    (item,), _ = _items("revision_with_solution", qwen_tokenizer, PromptConfig(), group)
    decoded = qwen_tokenizer.decode(item.teacher_ids)
    assert f"Here is a reference solution to this problem:\n{SOLUTION}<|im_end|>" in decoded
    assert decoded.endswith(
        "So \\boxed{5}.\n\nWait, this response is wrong. Let me correct it.\n\nSo \\boxed{5}.<|im_end|>"
    )


# Null context: the teacher's template is the student's own user turn; teacher weights = student weights.
NULL_TEMPLATES = {"reference_solution": "{prompt}", "successful_sibling": "{prompt}"}


@pytest.mark.parametrize("context_name", sorted(NULL_TEMPLATES))
@pytest.mark.parametrize("top_k", [None, 5])
def test_null_context_gives_zero_loss_and_zero_gradients(tiny_tokenizer, tiny_model_dir, context_name, top_k):
    from transformers import AutoModelForCausalLM

    cfg = PromptConfig(teacher=TeacherPromptConfig(user_template=NULL_TEMPLATES[context_name]))
    group = _group(
        tiny_tokenizer, ["2 + 2 = 4, so \\boxed{4}.", "\\boxed{4}", "it is 5"], [True, True, False]
    )
    items, _ = _items(context_name, tiny_tokenizer, cfg, group)
    assert items and all(i.teacher_ids == i.student_ids for i in items)  # the same sequence
    div = Divergence("mixed", top_k=top_k, temperature=1.1, clip_per_entry=0.05)
    teacher = Teacher(ModelConfig(path=str(tiny_model_dir), dtype="float32"), div, device="cpu")
    teacher.model.double()
    scores = teacher.score([(i.teacher_ids, i.teacher_mask) for i in items])
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    samples = [
        LearnerSample(i.student_ids, i.student_mask, i.reward, None, s)
        for i, s in zip(items, scores, strict=True)
    ]
    objective = build_objective("distillation", div, student.config.vocab_size)
    objective.set_teacher_lm_head(teacher.lm_head_weight())
    loss, _ = objective.micro_batch_loss(TargetLogitsLM(student, 4), samples, 0, torch.device("cpu"))
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    assert abs(float(loss.detach())) < 1e-12
    assert all(g is None or float(g.abs().max()) < 1e-10 for g in grads)


@pytest.mark.parametrize("context_name", TEACHER_CONTEXTS)
def test_teacher_logprobs_equal_a_plain_forward_of_each_unpadded_sequence(
    tiny_tokenizer, tiny_model_dir, context_name
):
    texts = ["2 + 2 = 4, so the answer is \\boxed{4}.", "\\boxed{4}", "it is 5", "Let me see: 4"]
    items, _ = _items(
        context_name, tiny_tokenizer, PromptConfig(), _group(tiny_tokenizer, texts, [True, True, False, True])
    )
    assert len({len(i.teacher_ids) for i in items}) > 1  # unequal lengths: the teacher's batches are padded
    div = Divergence("reverse", top_k=7, temperature=0.9)
    teacher = Teacher(
        ModelConfig(path=str(tiny_model_dir), dtype="float32"), div, device="cpu", micro_batch_size=3
    )
    teacher.model.double()
    scores = teacher.score([(i.teacher_ids, i.teacher_mask) for i in items])
    with torch.no_grad():
        for item, score in zip(items, scores, strict=True):
            logits = teacher.model(torch.tensor([item.teacher_ids])).logits[0]  # unpadded, alone
            positions = [p - 1 for p, m in enumerate(item.teacher_mask) if m]
            expected = (logits[positions] / 0.9).log_softmax(-1).topk(7, -1)
            torch.testing.assert_close(score["logprobs"], expected.values, rtol=1e-9, atol=1e-12)
            assert torch.equal(score["ids"].long(), expected.indices)
            raw = logits[positions].log_softmax(-1)
            targets = torch.tensor([t for t, m in zip(item.teacher_ids, item.teacher_mask, strict=True) if m])
            torch.testing.assert_close(score["target_logprobs"], raw.gather(-1, targets[:, None])[:, 0])
