"""The teacher-context seam: what the teacher reads before the student's own response y (Phase 2).

Every context turns one graded sample into an aligned (student, teacher) pair of token sequences whose
targets are the same tokens y, built from token ids and checked by `sequences.check_alignment`, or into
a skip with a reason the driver counts:

    build(problem, student_prompt_ids, response_ids, verdict, group) -> ContextResult(pair | None, skip)

`group` is every graded sample of the same prompt (contexts that use a sibling need it). Contexts:
    self_revision  SD-Zero (paper Sec. 3.2): chat(x) + y' + "\\n\\n" + P_r + "\\n\\n" + y, where y' is y
                   without its end-of-turn token (`keep_first_copy_eos`) and P_r is chosen by the
                   verdict (`prompts.build_phrase_ids`); y is cut in both copies to fit the budget.
The teacher's prompt is `prompts.build_teacher_prompt` (the student's unless `prompt.teacher` sets
its own template, system prompt, chat-template kwargs or assistant prefix).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from self_distillation.sequences import DistillationPair, build_teacher_sequence
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards import Verdict

TEACHER_CONTEXTS: tuple[str, ...] = ("self_revision",)


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
        teacher_prompt = self.teacher_prompt_ids(problem)
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


def build_teacher_context(
    name: str,
    *,
    teacher_prompt_ids: Callable[[Problem], list[int]],
    phrase_ids: dict[bool, list[int]],
    eos_token_ids: frozenset[int],
    keep_first_copy_eos: bool,
    max_teacher_tokens: int | None,
) -> TeacherContext:
    """The context `name` (TEACHER_CONTEXTS)."""
    if name == "self_revision":
        return SelfRevisionContext(
            teacher_prompt_ids,
            phrase_ids,
            eos_token_ids=eos_token_ids,
            keep_first_copy_eos=keep_first_copy_eos,
            max_teacher_tokens=max_teacher_tokens,
        )
    raise ValueError(f"unknown teacher context {name!r}; choose one of {list(TEACHER_CONTEXTS)}")
