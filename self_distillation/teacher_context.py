"""The teacher-context seam: what the teacher reads before the student's own response y (Phase 2).

Every context turns one graded sample into an aligned (student, teacher) pair of token sequences whose
targets are the same tokens y, built from token ids and checked by `sequences.check_alignment`, or into
a skip with a reason the driver counts:

    build(problem, student_prompt_ids, response_ids, verdict, group) -> ContextResult(pair | None, skip)

`group` is every graded sample of the same prompt (contexts that use a sibling need it). Contexts:
    self_revision           SD-Zero (paper Sec. 3.2): chat(x) + y' + "\\n\\n" + P_r + "\\n\\n" + y, where y' is
                            y without its end-of-turn token (`keep_first_copy_eos`) and P_r is chosen by
                            the verdict (`prompts.build_phrase_ids`); y is cut in both copies to fit.
    reference_solution      OPSD (siyan-zhao/OPSD): chat(user: OPSD's teacher message with the problem's
                            reference solution) + y; the student reads chat(user: problem + instruction) + y.
    revision_with_solution  both signals (no peer has it): chat(user: problem + reference solution) + y' +
                            "\\n\\n" + P_r + "\\n\\n" + y.
    successful_sibling      SDPO (TRL): another sample of the same prompt that was graded correct becomes the
                            teacher's demonstration (SDPO's reprompt template) + y; a sample without one
                            is skipped (`no_successful_sibling`).
The teacher's prompt is `prompts.build_teacher_prompt` (the student's unless `prompt.teacher` sets its own
template, system prompt, chat-template kwargs or assistant prefix, e.g. "<think>\\n" for a thinking teacher).
A context's privileged text (the solution, the sibling) is cut, never the template, when the teacher
sequence would exceed `max_teacher_tokens` (`info["privileged_truncated"]`); `user_template` may name a
shipped template (`prompts.TEMPLATES`: opsd, opsd_first_release, with_solution, sdpo) or be a template string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from self_distillation.sequences import DistillationPair, build_pair, build_teacher_sequence
from self_revision_training.shared.config import PromptConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.prompts import (
    ChatTokenizer,
    build_phrase_ids,
    build_teacher_prompt,
    encode_text,
)
from self_revision_training.shared.rewards import Verdict

TEACHER_CONTEXTS: tuple[str, ...] = (
    "self_revision",
    "reference_solution",
    "revision_with_solution",
    "successful_sibling",
    "none",
)
CONTEXTS_READING_REWARD = frozenset({"self_revision", "revision_with_solution", "successful_sibling"})
DEFAULT_TEMPLATES = {
    "reference_solution": "opsd",
    "revision_with_solution": "with_solution",
    "successful_sibling": "sdpo",
}


@dataclass(frozen=True)
class GroupSample:
    response_ids: list[int]  # y, with its end-of-turn token when it stopped on its own
    text: str
    verdict: Verdict


@dataclass(frozen=True)
class ContextResult:
    pair: DistillationPair | None
    skip_reason: str | None = None  # why there is no pair (counted by the driver)
    info: dict[str, float] = field(default_factory=dict)  # per-sample facts the driver aggregates


class TeacherContext(Protocol):
    name: str
    needs_reward: bool  # the context reads r (the driver refuses reward=none)

    def build(
        self,
        problem: Problem,
        student_prompt_ids: list[int],
        response_ids: list[int],
        verdict: Verdict,
        group: list[GroupSample],
    ) -> ContextResult: ...


class SelfRevisionContext:
    """SD-Zero: the teacher re-reads y after the outcome-conditioned phrase P_r."""

    name = "self_revision"
    needs_reward = True

    def __init__(
        self,
        teacher_prompt_ids: Callable[[Problem], list[int]],
        phrase_ids: dict[bool, list[int]],
        *,
        eos_token_ids: frozenset[int],
        keep_first_copy_eos: bool = False,
        max_teacher_tokens: int | None = None,
    ):
        self.teacher_prompt_ids = teacher_prompt_ids
        self.phrase_ids = phrase_ids
        self.eos_token_ids = eos_token_ids
        self.keep_first_copy_eos = keep_first_copy_eos
        self.max_teacher_tokens = max_teacher_tokens

    def build(
        self,
        problem: Problem,
        student_prompt_ids: list[int],
        response_ids: list[int],
        verdict: Verdict,
        group: list[GroupSample],
    ) -> ContextResult:
        if not response_ids:
            return ContextResult(None, "empty_response")
        return self.build_with_prompt(
            self.teacher_prompt_ids(problem), student_prompt_ids, response_ids, verdict
        )

    def build_with_prompt(
        self,
        teacher_prompt: list[int],
        student_prompt_ids: list[int],
        response_ids: list[int],
        verdict: Verdict,
    ) -> ContextResult:
        pair = build_teacher_sequence(
            student_prompt_ids,
            response_ids,
            self.phrase_ids[bool(verdict.correct)],
            eos_token_ids=self.eos_token_ids,
            keep_first_copy_eos=self.keep_first_copy_eos,
            max_teacher_tokens=self.max_teacher_tokens,
            teacher_prompt_ids=None if teacher_prompt == student_prompt_ids else teacher_prompt,
        )
        return ContextResult(pair, None if pair is not None else "no_teacher_budget")


def resolve_template(prompt_cfg: PromptConfig, context: str) -> PromptConfig:
    """The prompt config with the teacher's user template set: as configured (a `prompts.TEMPLATES` name or
    a template string), else the context's default."""
    template = prompt_cfg.teacher.user_template or DEFAULT_TEMPLATES[context]
    return dataclasses.replace(
        prompt_cfg, teacher=dataclasses.replace(prompt_cfg.teacher, user_template=template)
    )


class PrivilegedTextContext:
    """The teacher's user message holds a privileged text (a reference solution, a successful sibling).

    teacher = chat(user: template(problem, text)) [+ y' + P_r block] + y, built from token ids; when it
    would exceed the budget, the text (never the template) is cut token by token until it fits.
    """

    def __init__(
        self,
        name: str,
        tokenizer: ChatTokenizer,
        prompt_cfg: PromptConfig,
        *,
        max_teacher_tokens: int | None,
        revision: SelfRevisionContext | None = None,
    ):
        self.name = name
        self.tokenizer = tokenizer
        self.prompt_cfg = resolve_template(prompt_cfg, name)
        self.max_teacher_tokens = max_teacher_tokens
        self.revision = revision  # set: y' + P_r block + y after the prompt (revision_with_solution)
        self.needs_reward = name in CONTEXTS_READING_REWARD
        self._cache: dict[tuple[int, str], list[int]] = {}

    def privileged_text(
        self, problem: Problem, verdict: Verdict, group: list[GroupSample], j: int
    ) -> str | None:
        return problem.solution

    def _prompt(self, problem: Problem, text: str) -> list[int]:
        key = (problem.index, text)
        if key not in self._cache:
            if len(self._cache) > 4096:  # sibling texts vary per sample: keep the cache bounded
                self._cache.clear()
            self._cache[key] = build_teacher_prompt(
                self.tokenizer, problem.problem, self.prompt_cfg, text
            ).ids
        return self._cache[key]

    def _fit(self, problem: Problem, text: str, tail: int) -> tuple[list[int], bool]:
        """The teacher prompt with `text`, cut until prompt + `tail` tokens fit the budget (or `text` is empty)."""
        ids = self._prompt(problem, text)
        if self.max_teacher_tokens is None or len(ids) + tail <= self.max_teacher_tokens:
            return ids, False
        text_ids = encode_text(self.tokenizer, text)
        keep = len(text_ids)
        while keep > 0 and len(ids) + tail > self.max_teacher_tokens:
            keep = max(0, min(keep - 1, keep - (len(ids) + tail - self.max_teacher_tokens)))
            ids = build_teacher_prompt(
                self.tokenizer, problem.problem, self.prompt_cfg, self.tokenizer.decode(text_ids[:keep])
            ).ids
        return ids, True

    def build(
        self,
        problem: Problem,
        student_prompt_ids: list[int],
        response_ids: list[int],
        verdict: Verdict,
        group: list[GroupSample],
    ) -> ContextResult:
        if not response_ids:
            return ContextResult(None, "empty_response")
        # `group` holds the samples' own id lists (build_rollout_items), so identity finds this one
        j = next((i for i, g in enumerate(group) if g.response_ids is response_ids), -1)
        text = self.privileged_text(problem, verdict, group, j)
        if text is None:
            return ContextResult(None, self.missing_reason)
        if self.revision is None:
            prompt, cut = self._fit(problem, text, len(response_ids))
            if (
                self.max_teacher_tokens is not None
                and len(prompt) + len(response_ids) > self.max_teacher_tokens
            ):
                return ContextResult(None, "no_teacher_budget")
            pair = build_pair(student_prompt_ids, prompt, response_ids, truncated=False)
        else:  # the SD-Zero tail: first copy + phrase block + y (which build_teacher_sequence may still cut)
            tail = 2 * len(response_ids) + len(self.revision.phrase_ids[bool(verdict.correct)])
            prompt, cut = self._fit(problem, text, tail)
            result = self.revision.build_with_prompt(prompt, student_prompt_ids, response_ids, verdict)
            if result.pair is None:
                return result
            pair = result.pair
        return ContextResult(pair, None, {"privileged": 1.0, "privileged_truncated": float(cut)})

    missing_reason = "no_solution"


class SuccessfulSiblingContext(PrivilegedTextContext):
    """SDPO: the first OTHER sample of the group graded correct is the teacher's demonstration."""

    missing_reason = "no_successful_sibling"

    def privileged_text(
        self, problem: Problem, verdict: Verdict, group: list[GroupSample], j: int
    ) -> str | None:
        return next((g.text for i, g in enumerate(group) if i != j and g.verdict.correct), None)


class StudentOnlyContext:
    """No teacher (objectives that read none, e.g. GRPO): the 'teacher' sequence is the student's own."""

    name = "none"
    needs_reward = False

    def build(
        self,
        problem: Problem,
        student_prompt_ids: list[int],
        response_ids: list[int],
        verdict: Verdict,
        group: list[GroupSample],
    ) -> ContextResult:
        if not response_ids:
            return ContextResult(None, "empty_response")
        return ContextResult(
            build_pair(student_prompt_ids, student_prompt_ids, response_ids, truncated=False)
        )


def build_teacher_context(
    name: str,
    tokenizer: ChatTokenizer,
    prompt_cfg: PromptConfig,
    *,
    eos_token_ids: frozenset[int],
    keep_first_copy_eos: bool = False,
    max_teacher_tokens: int | None = None,
) -> TeacherContext:
    """The context `name` (TEACHER_CONTEXTS), building its prompts with `tokenizer` and `prompt_cfg`."""
    if name not in TEACHER_CONTEXTS:
        raise ValueError(f"unknown teacher context {name!r}; choose one of {list(TEACHER_CONTEXTS)}")
    if name == "none":
        return StudentOnlyContext()
    cache: dict[int, list[int]] = {}

    def teacher_prompt(problem: Problem) -> list[int]:
        if problem.index not in cache:
            cache[problem.index] = build_teacher_prompt(
                tokenizer, problem.problem, prompt_cfg, problem.solution
            ).ids
        return cache[problem.index]

    revision = SelfRevisionContext(
        teacher_prompt,
        build_phrase_ids(tokenizer, prompt_cfg),
        eos_token_ids=eos_token_ids,
        keep_first_copy_eos=keep_first_copy_eos,
        max_teacher_tokens=max_teacher_tokens,
    )
    if name == "self_revision":
        return revision
    if name == "successful_sibling":
        return SuccessfulSiblingContext(name, tokenizer, prompt_cfg, max_teacher_tokens=max_teacher_tokens)
    return PrivilegedTextContext(
        name,
        tokenizer,
        prompt_cfg,
        max_teacher_tokens=max_teacher_tokens,
        revision=revision if name == "revision_with_solution" else None,
    )
