"""Student and teacher token sequences for SD-Zero Phase 2 (paper Sec. 3.2, Fig. 1).

The student samples y after chat(x); the frozen SRT teacher reads

    chat(x) + y + "\\n\\n" + P_r + "\\n\\n" + y

and its next-token distributions over the SECOND copy of y are the targets. Everything is concatenated
as token ids (never by re-tokenising text), so the second copy is exactly the student's tokens and
target positions correspond one to one.

End-of-turn in the first copy (`keep_first_copy_eos`, default False): a naturally stopped y ends with the
end-of-turn token (e.g. `<|im_end|>`). The reference keeps it in the first copy, so the teacher reads
`... y<|im_end|>\\n\\nP_r ...`, a context Stage-1 SFT never shows it (there y_init runs straight into
the delimiter) and one that differs between stopped and truncated samples. The default strips it from
the first copy; the second copy keeps it, so the student still learns when to stop.

Length budget: when |prompt| + |first copy| + |phrase block| + |y| exceeds `max_teacher_tokens`, y is
cut to the same length L in both copies and for the student (L = the largest that fits); a sample with
no room (L < 1) is dropped (None) and the caller counts it.

The teacher may read its own prompt (`teacher_prompt_ids`, e.g. another chat-template setting, or a
problem with a reference solution); the student's sequence always starts with the student's prompt.
Other teacher contexts (`teacher_context.py`) build their sequences with `build_pair`, which checks the
alignment the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from self_revision_training.shared.prompts import strip_eos


class AlignmentError(ValueError):
    """Student and teacher target tokens do not correspond one to one."""


@dataclass(frozen=True)
class TokenSequence:
    input_ids: list[int]
    target_mask: list[int]  # 1 on the tokens that are distillation targets (the student's y)

    @property
    def target_ids(self) -> list[int]:
        return [t for t, m in zip(self.input_ids, self.target_mask, strict=True) if m]

    @property
    def logit_positions(self) -> list[int]:
        """Positions whose next-token logits predict the targets (target position - 1)."""
        return [i - 1 for i, m in enumerate(self.target_mask) if m]


@dataclass(frozen=True)
class DistillationPair:
    student: TokenSequence  # prompt_ids + y
    teacher: TokenSequence  # prompt_ids + y' + phrase_ids + y
    response_ids: list[int]  # the (possibly cut) y both target
    truncated: bool  # y was cut to fit max_teacher_tokens


def build_pair(
    student_prompt_ids: list[int], teacher_context_ids: list[int], response_ids: list[int], truncated: bool
) -> DistillationPair:
    """student = prompt + y, teacher = context + y, masks on y, alignment checked."""
    if not student_prompt_ids or not teacher_context_ids:
        raise ValueError("prompt ids are empty: the first target needs a preceding position")
    response = list(response_ids)
    teacher = TokenSequence(
        list(teacher_context_ids) + response, [0] * len(teacher_context_ids) + [1] * len(response)
    )
    student = TokenSequence(
        list(student_prompt_ids) + response, [0] * len(student_prompt_ids) + [1] * len(response)
    )
    check_alignment(student, teacher)
    return DistillationPair(student=student, teacher=teacher, response_ids=response, truncated=truncated)


def build_teacher_sequence(
    prompt_ids: list[int],
    response_ids: list[int],
    phrase_ids: list[int],
    *,
    eos_token_ids: frozenset[int] | set[int] = frozenset(),
    keep_first_copy_eos: bool = False,
    max_teacher_tokens: int | None = None,
    teacher_prompt_ids: list[int] | None = None,
) -> DistillationPair | None:
    """Build the aligned student and teacher sequences for one sample (SD-Zero's self-revision context).

    Args:
        prompt_ids: the student's prompt, including the assistant-start marker.
        teacher_prompt_ids: the teacher's prompt; None = the student's.
        response_ids: the sampled y, with its end-of-turn token when it stopped naturally.
        phrase_ids: token ids of delimiter + P_r + delimiter (see prompts.build_phrase_block).
        eos_token_ids: end-of-turn ids stripped from the first copy unless keep_first_copy_eos.
        max_teacher_tokens: budget for the teacher sequence; None = unlimited.
    Returns:
        The pair, or None when the budget leaves no room for even one response token.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the first target needs a preceding position")
    if not response_ids:
        return None  # an empty sample has nothing to distil
    teacher_prompt = list(prompt_ids if teacher_prompt_ids is None else teacher_prompt_ids)
    eos = frozenset(eos_token_ids)
    response = list(response_ids)
    truncated = False
    if max_teacher_tokens is not None:
        first_extra = 0 if keep_first_copy_eos or response[-1] not in eos else -1
        needed = len(teacher_prompt) + 2 * len(response) + first_extra + len(phrase_ids)
        if needed > max_teacher_tokens:
            allowance = (max_teacher_tokens - len(teacher_prompt) - len(phrase_ids)) // 2
            if allowance < 1:
                return None
            response = response[:allowance]  # a cut y has no end-of-turn left to strip
            truncated = True
    first_copy = response if keep_first_copy_eos else strip_eos(response, eos)
    return build_pair(prompt_ids, teacher_prompt + first_copy + list(phrase_ids), response, truncated)


def check_alignment(student: TokenSequence, teacher: TokenSequence) -> None:
    """Raise AlignmentError unless both sequences target the same tokens, in the same order."""
    student_targets, teacher_targets = student.target_ids, teacher.target_ids
    if len(student_targets) != len(teacher_targets):
        raise AlignmentError(
            f"student has {len(student_targets)} target tokens, teacher {len(teacher_targets)}"
        )
    if student_targets != teacher_targets:
        first = next(
            i for i, (a, b) in enumerate(zip(student_targets, teacher_targets, strict=True)) if a != b
        )
        raise AlignmentError(
            f"target token {first} differs: student {student_targets[first]}, "
            f"teacher {teacher_targets[first]}"
        )
    if min(student.logit_positions, default=0) < 0 or min(teacher.logit_positions, default=0) < 0:
        raise AlignmentError("a target at position 0 has no preceding position to predict it")
