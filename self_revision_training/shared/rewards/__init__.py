"""The binary reward r of a response: one interface over the math verifier and the code sandbox.

Collection, Phase 2 and evaluation grade through `build_verifier(mode, cfg)`, so another reward
source (e.g. majority-vote pseudo-labels) plugs in here without touching the loops.

    with build_verifier("math", GradingConfig()) as verifier:
        verdicts = verifier.grade(responses, problems)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards.code_tests import SandboxLimits, grade_code_batch
from self_revision_training.shared.rewards.math_verify import MathGrader


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # the extracted answer (math) or language (code)
    reason: str  # math: correct / wrong / no_answer / timeout / error; code: passed / wrong_answer / ...


class Verifier(Protocol):
    def grade(self, responses: list[str], problems: list[Problem]) -> list[Verdict]: ...

    def close(self) -> None: ...


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MathVerifier(_Closing):
    """math-verify in worker processes with a hard per-item deadline (grading.MathGrader)."""

    def __init__(self, cfg: GradingConfig):
        self._grader = MathGrader(cfg)

    def grade(self, responses: list[str], problems: list[Problem]) -> list[Verdict]:
        results = self._grader.grade_batch(responses, [p.answer for p in problems])
        return [Verdict(r.correct, r.extracted, r.reason) for r in results]

    def close(self) -> None:
        self._grader.close()


class CodeVerifier(_Closing):
    """The last fenced program, run on the problem's tests in the sandbox (code_sandbox)."""

    def __init__(self, cfg: GradingConfig, limits: SandboxLimits | None = None):
        self._workers = cfg.num_workers
        self._limits = limits or SandboxLimits()

    def grade(self, responses: list[str], problems: list[Problem]) -> list[Verdict]:
        results = grade_code_batch(
            responses, [list(p.tests) for p in problems], self._limits, num_workers=self._workers
        )
        return [Verdict(r.correct, r.language, r.reason) for r in results]


def build_verifier(mode: str, cfg: GradingConfig) -> MathVerifier | CodeVerifier:
    if mode == "math":
        return MathVerifier(cfg)
    if mode == "code":
        return CodeVerifier(cfg)
    raise ValueError(f"unknown grading mode {mode!r} (expected math or code)")
