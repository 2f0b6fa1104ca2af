"""Prompt builders: text and ids agree with the tokenizer, P_r selection, the saved prompt spec."""

from __future__ import annotations

import pytest

from self_revision_training.shared.config import (
    DEFAULT_CORRECT_PHRASE,
    DEFAULT_INCORRECT_PHRASE,
    PromptConfig,
)
from self_revision_training.shared.prompts import (
    PromptSpecError,
    build_generation_prompt,
    build_messages,
    build_phrase_block,
    build_revision_prompt,
    build_user_content,
    check_prompt_spec,
    load_prompt_spec,
    save_prompt_spec,
    select_phrase,
)

PROBLEMS = [
    "What is 2 + 2?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Find $x$ if $\\frac{x}{2} = 3$.\n\nGive the answer in \\boxed{}.",
    "计算 3 × 4 的值。 Café naïve — ü",
]
RESPONSES = ["2 + 2 = 4, so \\boxed{4}.", "\n\nFirst, 48/2 = 24.\n\nSo \\boxed{72}", "", "  x = 6  "]


def test_defaults_match_the_paper():
    cfg = PromptConfig()
    assert select_phrase(True, cfg) == "Let me rephrase the above solution." == DEFAULT_CORRECT_PHRASE
    assert (
        select_phrase(False, cfg)
        == "Wait, this response is wrong. Let me correct it."
        == DEFAULT_INCORRECT_PHRASE
    )
    assert cfg.instruction == "Please reason step by step, and put your final answer within \\boxed{}."
    assert build_phrase_block(False, cfg) == "\n\nWait, this response is wrong. Let me correct it.\n\n"


def test_phrases_are_configurable():
    cfg = PromptConfig(correct_phrase="Rephrase.", incorrect_phrase="Start over.", delimiter="\n")
    assert build_phrase_block(True, cfg) == "\nRephrase.\n"
    assert build_phrase_block(False, cfg) == "\nStart over.\n"


def test_user_content_positions():
    assert build_user_content("P", PromptConfig()) == "P\n\n" + PromptConfig().instruction
    assert build_user_content("P", PromptConfig(instruction_position="before", instruction="I")) == "I\n\nP"
    assert build_user_content("P", PromptConfig(instruction_position="none")) == "P"
    assert build_messages("P", PromptConfig(system_prompt="S"))[0] == {"role": "system", "content": "S"}
    assert len(build_messages("P", PromptConfig())) == 1


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
def test_ids_equal_the_tokenizers_own_encoding(request, which):
    tokenizer = request.getfixturevalue(which)
    cfg = PromptConfig(system_prompt="You solve math problems.")
    for problem in PROBLEMS:
        prompt = build_generation_prompt(tokenizer, problem, cfg)
        assert prompt.ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        templated = tokenizer.apply_chat_template(
            build_messages(problem, cfg), tokenize=False, add_generation_prompt=True
        )
        assert prompt.text == templated
        assert prompt.text.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(prompt.ids) == prompt.text
        for response, correct in zip(RESPONSES, (True, False, False, True), strict=True):
            rev = build_revision_prompt(tokenizer, problem, response, correct, cfg)
            block = build_phrase_block(correct, cfg)
            assert rev.text == prompt.text + response + block
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            block_ids = tokenizer(block, add_special_tokens=False)["input_ids"]
            assert rev.ids == prompt.ids + response_ids + block_ids  # segment by segment
            assert tokenizer.decode(rev.ids) == rev.text
            sampled = build_revision_prompt(tokenizer, problem, response, correct, cfg, response_ids=[7, 8])
            assert sampled.ids == prompt.ids + [7, 8] + block_ids


def test_joint_encoding_would_shift_boundaries_with_qwen(qwen_tokenizer):
    """Why builders concatenate per-segment ids: re-encoding the joined text merges across boundaries."""
    cfg = PromptConfig()
    prompt = build_generation_prompt(qwen_tokenizer, "What is 2 + 2?", cfg)
    response = "\n\nSo the answer is \\boxed{4}."
    rev = build_revision_prompt(qwen_tokenizer, "What is 2 + 2?", response, True, cfg)
    joint = qwen_tokenizer(rev.text, add_special_tokens=False)["input_ids"]
    assert joint != rev.ids
    assert joint[: len(prompt.ids) - 1] == prompt.ids[:-1]
    assert joint[len(prompt.ids) - 1] != prompt.ids[-1]  # "\n" of "assistant\n" merged with "\n\n"


def test_qwen_special_tokens(qwen_tokenizer):
    prompt = build_generation_prompt(qwen_tokenizer, "What is 2 + 2?", PromptConfig())
    assert prompt.ids[0] == 151644  # <|im_start|>
    assert 151645 in prompt.ids  # <|im_end|> closes the user turn
    assert prompt.ids[-3:-1] == [151644, 77091]  # <|im_start|>assistant, then "\n"


def test_prompt_spec_round_trip(tmp_path, tiny_tokenizer):
    cfg = PromptConfig(correct_phrase="Rephrase.", chat_template_kwargs={"enable_thinking": False})
    save_prompt_spec(tmp_path, tiny_tokenizer, cfg)
    loaded, spec = load_prompt_spec(tmp_path)
    assert loaded == cfg
    assert spec["chat_template"] == tiny_tokenizer.chat_template
    check_prompt_spec(spec, tiny_tokenizer, cfg)
    with pytest.raises(PromptSpecError, match="correct_phrase"):
        check_prompt_spec(spec, tiny_tokenizer, PromptConfig())
    with pytest.raises(PromptSpecError, match="not found"):
        load_prompt_spec(tmp_path / "elsewhere")


def test_tokenizer_without_chat_template(tiny_tokenizer):
    import copy

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(PromptSpecError, match="no chat_template"):
        build_generation_prompt(bare, "x", PromptConfig())
