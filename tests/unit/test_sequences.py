"""Teacher sequences: the second copy is exactly the student's tokens, with both tokenizers."""

from __future__ import annotations

import pytest

from self_distillation.sequences import AlignmentError, TokenSequence, build_teacher_sequence, check_alignment
from self_revision_training.shared.config import PromptConfig
from self_revision_training.shared.prompts import build_generation_prompt, build_phrase_block, encode_text

RESPONSES = [
    "2 + 2 = 4.\n\nSo the answer is \\boxed{4}.",
    "First line.\n\nSecond paragraph.\n\n\\boxed{72}",
    "\n\nStarts with blank lines",
    "x",
]


def pieces(tokenizer, text, correct=True, eos=True):
    cfg = PromptConfig()
    prompt = build_generation_prompt(tokenizer, "What is 2 + 2?", cfg)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    response = encode_text(tokenizer, text) + ([eos_id] if eos else [])
    phrase = encode_text(tokenizer, build_phrase_block(correct, cfg))
    return prompt.ids, response, phrase, eos_id


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("keep_eos", [True, False])
def test_targets_are_the_students_tokens(request, which, eos, keep_eos):
    tokenizer = request.getfixturevalue(which)
    for text in RESPONSES:
        prompt, response, phrase, eos_id = pieces(tokenizer, text, eos=eos)
        pair = build_teacher_sequence(
            prompt, response, phrase, eos_token_ids={eos_id}, keep_first_copy_eos=keep_eos
        )
        assert pair.teacher.target_ids == response == pair.student.target_ids
        assert sum(pair.teacher.target_mask) == len(response) == sum(pair.student.target_mask)
        first = response if keep_eos or not eos else response[:-1]
        assert pair.teacher.input_ids == prompt + first + phrase + response
        assert pair.student.input_ids == prompt + response
        # every logit position predicts its target: input_ids[pos + 1] is the target token
        for seq in (pair.student, pair.teacher):
            assert [seq.input_ids[p + 1] for p in seq.logit_positions] == response
        decoded = tokenizer.decode(pair.teacher.input_ids)
        assert build_phrase_block(True, PromptConfig()) in decoded


def test_budget_cuts_both_copies_and_the_student(qwen_tokenizer):
    prompt, response, phrase, eos_id = pieces(qwen_tokenizer, RESPONSES[1])
    budget = len(prompt) + len(phrase) + 2 * 5 + 1
    pair = build_teacher_sequence(prompt, response, phrase, eos_token_ids={eos_id}, max_teacher_tokens=budget)
    assert pair.truncated and pair.response_ids == response[:5]
    assert pair.student.target_ids == response[:5] == pair.teacher.target_ids
    assert len(pair.teacher.input_ids) <= budget
    # exactly at the budget: nothing is cut (the stripped first-copy eos is accounted for)
    exact = len(prompt) + len(phrase) + 2 * len(response) - 1
    pair = build_teacher_sequence(prompt, response, phrase, eos_token_ids={eos_id}, max_teacher_tokens=exact)
    assert not pair.truncated and pair.response_ids == response
    # no room at all: dropped
    assert (
        build_teacher_sequence(prompt, response, phrase, max_teacher_tokens=len(prompt) + len(phrase) + 1)
        is None
    )


def test_empty_response_and_bad_prompt(tiny_tokenizer):
    prompt, _, phrase, _ = pieces(tiny_tokenizer, "x")
    assert build_teacher_sequence(prompt, [], phrase) is None
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        build_teacher_sequence([], [1, 2], phrase)


def test_only_eos_response(tiny_tokenizer):
    prompt, _, phrase, eos_id = pieces(tiny_tokenizer, "x")
    pair = build_teacher_sequence(prompt, [eos_id], phrase, eos_token_ids={eos_id})
    assert pair.teacher.input_ids == prompt + phrase + [eos_id]
    assert pair.teacher.target_ids == [eos_id]


def test_mismatch_is_an_error():
    student = TokenSequence([1, 2, 3], [0, 1, 1])
    with pytest.raises(AlignmentError, match="2 target tokens, teacher 1"):
        check_alignment(student, TokenSequence([1, 9, 3], [0, 0, 1]))
    with pytest.raises(AlignmentError, match="target token 0 differs"):
        check_alignment(student, TokenSequence([1, 9, 3], [0, 1, 1]))
