"""Prompt construction shared by every phase and by evaluation (paper Sec. 3, Fig. 1).

One template for all phases (the reference used three; see the README's "Departures from the reference"):
the tokenizer's own chat template, an optional system turn, and the user turn
`problem + "\n\n" + instruction` (or the instruction first). After a response y is graded (r), the
outcome-conditioned phrase P_r is appended inside the assistant turn:

    chat(x) + y + delimiter + P_r + delimiter        (the model then writes the revision)

Builders return both the text and its token ids. Token ids are concatenated per segment
(chat prompt | response | phrase block | revision), each segment encoded on its own, and never by
re-encoding the joined text: BPE merges across a boundary (Qwen turns the template's trailing "\n" plus
a response's leading "\n\n" into one token, and "}." plus "\n\n" into "}.\n\n") would otherwise
show the model token sequences it never sampled, and Phase 1, SFT and the Phase-2 teacher would each
see a different tokenisation of the same text. `decode(ids) == text` holds for every builder.
`save_prompt_spec` writes the prompt config and the chat template next to every dataset and checkpoint;
later phases read it back with `load_prompt_spec` instead of guessing from file or model names.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from self_revision_training.shared.config import PromptConfig, from_dict, to_dict
from self_revision_training.shared.storage import atomic_write_json

PROMPT_SPEC_FILE = "sdzero_prompt.json"
PROMPT_SPEC_VERSION = 1


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the prompt builders use."""

    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PromptTokens:
    text: str
    ids: list[int]


class PromptSpecError(ValueError):
    """A missing or inconsistent prompt spec (sdzero_prompt.json)."""


_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# OPSD's student message (all releases; siyan-zhao/OPSD:data_collator.py): the student's user_template.
OPSD_STUDENT_TEMPLATE = "Problem: {problem}\n\n" + _BOXED_INSTRUCTION
_OPSD_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
    "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:\n"
)
_OPSD_FIRST_RELEASE_TRANSITION = (
    "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your "
    "own step-by-step reasoning that derives the same final answer to the problem below:\n"
)
TEMPLATES = {  # named user templates; {prompt} = the student's whole user turn; filled in one pass
    # OPSD's current teacher message (as mirrored in KongJing777/OPSD:data_collator.py @4cca250)
    "opsd": (
        "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        "{solution}\n=== Reference Solution End ===\n" + _OPSD_TRANSITION + "\n" + _BOXED_INSTRUCTION
    ),
    # OPSD's first release (siyan-zhao/OPSD:data_collator.py @590ec26)
    "opsd_first_release": (
        "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n"
        + _OPSD_FIRST_RELEASE_TRANSITION
        + "\n"
        + _BOXED_INSTRUCTION
    ),
    # revision_with_solution: the SRT teacher's own user turn with the reference solution appended
    "with_solution": "{prompt}\n\nHere is a reference solution to this problem:\n{solution}",
    # SDPO (trl/experimental/sdpo): reprompt_template with solution_template, no environment feedback
    "sdpo": "{prompt}\nCorrect solution:\n\n{solution}\n\n\n\nCorrectly solve the original question.\n",
    # OPSD's student message (a `prompt.user_template`)
    "opsd_student": OPSD_STUDENT_TEMPLATE,
}


_PLACEHOLDER = re.compile(r"\{(problem|solution|instruction|prompt)\}")


def fill_template(template: str, **values: str | None) -> str:
    """Substitute {problem}, {solution}, {instruction}, {prompt} in one pass (values are not re-scanned, so
    braces in a problem or solution, e.g. LaTeX, survive as written); a placeholder without a value is an
    error. `template` may name one of TEMPLATES."""

    def sub(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        if value is None:
            raise PromptSpecError(f"prompt template uses {{{match.group(1)}}} but no value is available")
        return value

    return _PLACEHOLDER.sub(sub, TEMPLATES.get(template, template))


def build_user_content(problem: str, cfg: PromptConfig) -> str:
    """The user turn: `user_template`, else the problem with the instruction after/before it, or alone."""
    if cfg.user_template is not None:
        return fill_template(cfg.user_template, problem=problem, instruction=cfg.instruction)
    if cfg.instruction_position == "none":
        return problem
    if cfg.instruction_position == "after":
        return problem + cfg.instruction_separator + cfg.instruction
    return cfg.instruction + cfg.instruction_separator + problem


def _messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*messages, {"role": "user", "content": user}]


def build_messages(problem: str, cfg: PromptConfig) -> list[dict[str, str]]:
    return _messages(cfg.system_prompt, build_user_content(problem, cfg))


def encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (the text already carries them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_chat_prompt_text(
    tokenizer: ChatTokenizer, messages: list[dict[str, str]], cfg: PromptConfig, kwargs: dict | None = None
) -> str:
    """The chat template rendered up to and including the assistant-start marker.

    Args:
        kwargs: chat-template kwargs; None = `cfg.chat_template_kwargs` (the student's).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise PromptSpecError(f"{name} has no chat_template; SD-Zero prompts need a chat model's tokenizer")
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=True,
        **(cfg.chat_template_kwargs if kwargs is None else kwargs),
    )
    if not isinstance(text, str):
        raise PromptSpecError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def build_generation_prompt(tokenizer: ChatTokenizer, problem: str, cfg: PromptConfig) -> PromptTokens:
    """chat(x): the prompt from which y_init (Phase 1) or y (Phase 2, evaluation) is sampled."""
    text = build_chat_prompt_text(tokenizer, build_messages(problem, cfg), cfg)
    return PromptTokens(text=text, ids=encode_text(tokenizer, text))


def build_teacher_prompt(
    tokenizer: ChatTokenizer, problem: str, cfg: PromptConfig, solution: str | None = None
) -> PromptTokens:
    """The Phase-2 teacher's prompt: the student's chat(x) unless `cfg.teacher` sets its own user template
    ({problem}, {solution}, {instruction}; {prompt} = the student's whole user turn), system prompt,
    chat-template kwargs or assistant prefix (text after the assistant-start marker, its own segment)."""
    teacher = cfg.teacher
    system = cfg.system_prompt if teacher.system_prompt is None else (teacher.system_prompt or None)
    if teacher.user_template is None:
        user = build_user_content(problem, cfg)
    else:
        user = fill_template(
            teacher.user_template,
            problem=problem,
            solution=solution,
            instruction=cfg.instruction,
            prompt=build_user_content(problem, cfg),
        )
    messages = _messages(system, user)
    text = build_chat_prompt_text(tokenizer, messages, cfg, teacher.chat_template_kwargs)
    ids = encode_text(tokenizer, text)
    if teacher.assistant_prefix:
        ids += encode_text(tokenizer, teacher.assistant_prefix)
    return PromptTokens(text=text + teacher.assistant_prefix, ids=ids)


def select_phrase(correct: bool, cfg: PromptConfig) -> str:
    """P_r: the rephrase cue for a correct response (r=1), the correct-it cue otherwise (r=0)."""
    return cfg.correct_phrase if correct else cfg.incorrect_phrase


def join_phrase_block(phrase: str, delimiter: str) -> str:
    """delimiter + P_r + delimiter: the one place this layout is written (every phase calls it)."""
    return delimiter + phrase + delimiter


def build_phrase_block(correct: bool, cfg: PromptConfig) -> str:
    """delimiter + P_r + delimiter for a graded response: what separates it from its revision."""
    return join_phrase_block(select_phrase(correct, cfg), cfg.delimiter)


def build_phrase_ids(tokenizer: ChatTokenizer, cfg: PromptConfig) -> dict[bool, list[int]]:
    """Token ids of the phrase block for each verdict, encoded on their own (see the module docstring)."""
    return {correct: encode_text(tokenizer, build_phrase_block(correct, cfg)) for correct in (True, False)}


def build_revision_stage_texts(
    x: str, y_init: str, phrase: str, y_revised: str, delimiter: str
) -> dict[int, tuple[str, str]]:
    """The reference's text layouts of one verified tuple: {stage: (prompt, completion)} (reference §3).

    Stage 1: x                              -> y_init + d + P_r + d + y_revised
    Stage 2: x + d + y_init + d + P_r       -> y_revised
    """
    return {
        1: (x, y_init + join_phrase_block(phrase, delimiter) + y_revised),
        2: (x + delimiter + y_init + delimiter + phrase, y_revised),
    }


def strip_eos(ids: list[int], eos_token_ids: frozenset[int] | set[int]) -> list[int]:
    """`ids` without a final end-of-turn token (a response continued inside the same assistant turn)."""
    return list(ids[:-1]) if ids and ids[-1] in eos_token_ids else list(ids)


def build_revision_prompt(
    tokenizer: ChatTokenizer,
    problem: str,
    response: str,
    correct: bool,
    cfg: PromptConfig,
    response_ids: list[int] | None = None,
) -> PromptTokens:
    """chat(x) + y_init + delimiter + P_r + delimiter, continued by the model as y_revised (Phase 1).

    Args:
        response_ids: the sampled token ids of `response` (without EOS) when known; otherwise the
            response text is encoded on its own.
    """
    prompt = build_generation_prompt(tokenizer, problem, cfg)
    block = build_phrase_block(correct, cfg)
    body_ids = list(response_ids) if response_ids is not None else encode_text(tokenizer, response)
    ids = prompt.ids + body_ids + encode_text(tokenizer, block)
    return PromptTokens(text=prompt.text + response + block, ids=ids)


def chat_template_sha256(tokenizer: ChatTokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if not isinstance(template, str):  # some tokenizers carry a dict of named templates
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def build_prompt_spec(tokenizer: ChatTokenizer, cfg: PromptConfig) -> dict[str, Any]:
    """Everything needed to rebuild the prompts exactly: the prompt config and the chat template."""
    return {
        "format_version": PROMPT_SPEC_VERSION,
        "prompt": to_dict(cfg),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "eos_token": getattr(tokenizer, "eos_token", None),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
    }


def save_prompt_spec(directory: str | Path, tokenizer: ChatTokenizer, cfg: PromptConfig) -> Path:
    path = Path(directory) / PROMPT_SPEC_FILE
    atomic_write_json(path, build_prompt_spec(tokenizer, cfg))
    return path


def load_prompt_spec(directory: str | Path) -> tuple[PromptConfig, dict[str, Any]]:
    """Read `sdzero_prompt.json` from a dataset or checkpoint directory -> (PromptConfig, raw spec)."""
    path = Path(directory) / PROMPT_SPEC_FILE
    if not path.is_file():
        raise PromptSpecError(f"{path} not found: {directory} was not written by SD-Zero (no prompt spec)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromptSpecError(f"{path}: not valid JSON ({exc})") from exc
    if spec.get("format_version") != PROMPT_SPEC_VERSION:
        raise PromptSpecError(
            f"{path}: format_version {spec.get('format_version')!r} != {PROMPT_SPEC_VERSION}"
        )
    return from_dict(PromptConfig, spec["prompt"], prefix="prompt."), spec


def check_prompt_spec(spec: dict[str, Any], tokenizer: ChatTokenizer, cfg: PromptConfig) -> None:
    """Raise if `tokenizer`/`cfg` would build different prompts than the ones recorded in `spec`."""
    recorded = to_dict(from_dict(PromptConfig, spec["prompt"], prefix="prompt."))  # older specs: defaults
    if recorded != to_dict(cfg):
        diff = {k: (recorded.get(k), v) for k, v in to_dict(cfg).items() if recorded.get(k) != v}
        raise PromptSpecError(f"prompt config differs from the recorded one (recorded, current): {diff}")
    if spec.get("chat_template_sha256") != chat_template_sha256(tokenizer):
        raise PromptSpecError("the tokenizer's chat template differs from the recorded one")
