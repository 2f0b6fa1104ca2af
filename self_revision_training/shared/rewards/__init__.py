"""The reward-source seam: the binary reward r of every response, scored a whole group at a time.

Every phase and method grades through `build_reward_source(name, mode, grading)`:

    with build_reward_source("ground_truth", "math", GradingConfig()) as reward:
        verdicts = reward.score(problems, groups)   # groups[i]: the responses to problems[i]

`score` sees each problem's whole group of responses, so a source may decide r from the group (the
majority-vote pseudo-label plugs in here); a `Verdict` carries r, the extracted answer, the reason and
the label it was compared with. Implementations:
    ground_truth  math: math-verify against `Problem.answer` in worker processes with a hard per-item
                  deadline (`math_verify.MathGrader`); code: the last fenced program on `Problem.tests` in
                  the sandbox (`code_tests`). An empty response is r=0 ("empty_response") without a call.
    none          no reward (methods whose signal does not depend on r, e.g. SSD); every verdict is
                  r=0 with reason "no_reward" and no label.
    majority_vote math: r = the response's answer is in the label's cluster of its group's own vote
                  (online, TTRL-style; `majority_vote.MajorityVoteReward`, `VoteConfig`), or is equivalent
                  to the row's pseudo-label when the row comes from the labelling stage (offline:
                  `label_source: vote`). A group whose vote is skipped (tie, below tau, no answer) gets
                  verdicts with `skip` set: they carry no r and must be dropped, never distilled with P_0.
P_r is chosen from a verdict by `prompts.build_phrase_block(verdict.correct, ...)`, for verdicts whose
`skip` is None. The optional audit fields (`gold_correct`, `label_correct`, `vote_ratio`) feed
`majority_vote.compute_vote_audit`; sources that do not know them leave them None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards.code_tests import SandboxLimits, grade_code_batch
from self_revision_training.shared.rewards.math_verify import MathGrader

RewardName = Literal["ground_truth", "none", "majority_vote"]
REWARD_NAMES: tuple[str, ...] = ("ground_truth", "none", "majority_vote")


@dataclass(frozen=True)
class Verdict:
    correct: bool  # r
    extracted: str | None  # the extracted answer (math) or the program's language (code)
    reason: str  # math: correct / wrong / no_answer / timeout / ...; code: passed / wrong_answer / ...
    label: str | None = None  # what the response was compared with (math: the ground truth); None = none
    skip: str | None = None  # why this sample has no usable r (e.g. "vote_tie"): drop it; None = usable
    gold_correct: bool | None = None  # audit: r against the hidden gold answer; None = no gold known
    label_correct: bool | None = None  # audit: the group's (candidate) label equals the gold answer
    vote_ratio: float | None = None  # majority vote: label cluster size / k; None = not a vote


class RewardSource(Protocol):
    name: str

    def score(self, problems: list[Problem], groups: list[list[str]]) -> list[list[Verdict]]: ...

    def close(self) -> None: ...


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_groups(problems: list[Problem], groups: list[list[str]]) -> None:
    if len(problems) != len(groups):
        raise ValueError(f"{len(problems)} problems but {len(groups)} groups of responses")


class GroundTruthReward(_Closing):
    """r = the response verifies against the problem's reference (math answer or code tests)."""

    name = "ground_truth"

    def __init__(
        self, mode: Literal["math", "code"], cfg: GradingConfig, limits: SandboxLimits | None = None
    ):
        if mode not in ("math", "code"):
            raise ValueError(f"unknown grading mode {mode!r} (expected math or code)")
        self.mode = mode
        self._grader = MathGrader(cfg) if mode == "math" else None
        self._workers = cfg.num_workers
        self._limits = limits or SandboxLimits()

    def _grade(self, responses: list[str], problems: list[Problem]) -> list[Verdict]:
        if self._grader is not None:
            results = self._grader.grade_batch(responses, [p.answer for p in problems])
            return [
                Verdict(r.correct, r.extracted, r.reason, p.answer)
                for r, p in zip(results, problems, strict=True)
            ]
        results = grade_code_batch(
            responses, [list(p.tests) for p in problems], self._limits, num_workers=self._workers
        )
        return [Verdict(r.correct, r.language, r.reason) for r in results]

    def score(self, problems: list[Problem], groups: list[list[str]]) -> list[list[Verdict]]:
        _check_groups(problems, groups)
        if self.mode == "math":
            unlabelled = [p.index for p in problems if not p.answer]
            if unlabelled:
                raise ValueError(
                    f"reward ground_truth: problems {unlabelled[:10]} have no answer (dataset.answers="
                    "optional); use reward=majority_vote (or label them with pseudo_label first)"
                )
        flat = [(i, j) for i, group in enumerate(groups) for j in range(len(group))]
        todo = [(i, j) for i, j in flat if groups[i][j].strip()]  # empty responses need no verifier call
        graded = self._grade([groups[i][j] for i, j in todo], [problems[i] for i, _ in todo]) if todo else []
        out: list[list[Verdict | None]] = [[None] * len(group) for group in groups]
        for (i, j), verdict in zip(todo, graded, strict=True):
            out[i][j] = verdict
        label = (lambda p: p.answer) if self.mode == "math" else (lambda p: None)
        return [
            [v if v is not None else Verdict(False, None, "empty_response", label(problems[i])) for v in row]
            for i, row in enumerate(out)
        ]

    def close(self) -> None:
        if self._grader is not None:
            self._grader.close()


class NoReward(_Closing):
    """No reward: methods whose training signal does not depend on r."""

    name = "none"

    def score(self, problems: list[Problem], groups: list[list[str]]) -> list[list[Verdict]]:
        _check_groups(problems, groups)
        return [[Verdict(False, None, "no_reward") for _ in group] for group in groups]


def build_reward_source(name: str, mode: str, cfg: GradingConfig, vote: Any = None) -> RewardSource:
    """The reward source `name` (REWARD_NAMES) for a dataset in `mode` (math | code).

    Args:
        vote: `majority_vote.VoteConfig` for name=majority_vote (None = its defaults); ignored otherwise.
    """
    if name == "ground_truth":
        return GroundTruthReward(mode, cfg)  # type: ignore[arg-type]
    if name == "none":
        return NoReward()
    if name == "majority_vote":
        if mode != "math":
            raise ValueError(f"reward majority_vote votes on math answers; dataset mode is {mode!r}")
        from self_revision_training.shared.rewards.majority_vote import MajorityVoteReward  # imports Verdict

        return MajorityVoteReward(cfg, vote)
    raise ValueError(f"unknown reward source {name!r}; choose one of {list(REWARD_NAMES)}")
