"""The `majority_vote` reward source: r from the model's own consensus instead of a reference answer.

Related methods §3 (TTRL; Noisy Student; GATES). Per prompt, the answers of its group of responses are
extracted, clustered by math-verify equivalence (`answers.cluster_answer_groups` with
`equivalence.AnswerEquivalence`), and the largest cluster is the label; vote_ratio = its size / k, with
unparsed answers counted in k. Two ways to use it, chosen per row:

    online   (a row without `label_source: vote`) the group's own vote, TTRL-style: r_i = response i's
             answer is in the label's cluster (so mean r = vote_ratio). A tie, a ratio below tau or a group
             without any answer is skipped: every verdict gets `skip` = vote_tie / vote_below_threshold /
             vote_no_answer, r = 0 and reason "vote_skipped". `VoteConfig.train_samples = m` keeps all n
             responses voting but marks responses m.. with skip "vote_not_trained" (TTRL: 32 of 64).
             The row's `answer`, when it has one, is gold: hidden from the vote, used only for the audit.
    offline  (a row written by `python -m self_revision_training.pseudo_label`, `label_source: vote`) r_i =
             response i's answer is equivalent to the row's pseudo-label (`answer`), as `ground_truth`
             would grade it; `gold_answer` (audit sets) feeds the audit fields. No row is skipped here:
             the labelling stage already left skipped problems out. Gold rows mixed into such a file
             (`label_source: gold`, Noisy-Student mixes) are fixed labels too, and their own gold.

Skipped verdicts carry no reward: the Phase-1 collector and Phase 2 must drop them (count them by
`skip`), never distil them with the "wrong" cue P_0. `compute_vote_audit` turns groups of verdicts into
the audit metrics (coverage, label / reward accuracy, false-positive and false-negative P_r rates,
label accuracy by vote-ratio bucket) wherever gold answers exist.

    with MajorityVoteReward(GradingConfig(), VoteConfig(threshold=0.5)) as reward:
        verdicts = reward.score(problems, groups)
        metrics = compute_vote_audit(verdicts, prefix="vote/")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from self_revision_training.shared.answers import (
    VOTE_SKIPS,
    Equivalence,
    cluster_answer_groups,
    compute_vote,
    extract_answer,
)
from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.problems import Problem
from self_revision_training.shared.rewards import Verdict, _check_groups, _Closing

LABEL_SOURCE = "vote"  # `label_source` of a row labelled by the vote
GOLD_SOURCE = "gold"  # `label_source` of a gold-labelled row mixed in with pseudo-labelled ones
GOLD_FIELD = "gold_answer"  # the hidden gold answer of a labelled row (audits only; never the reward)
NOT_TRAINED = "vote_not_trained"  # skip of a response that voted but is not trained on
SKIPPED_REASON = "vote_skipped"  # reason of every verdict of a skipped group
DEFAULT_BUCKETS = (0.25, 0.5, 0.75, 1.0)  # upper edges of the vote-ratio buckets of the audit


@dataclass
class VoteConfig:
    threshold: float = 0.5  # tau: keep a label iff its cluster holds >= tau of the k responses
    tie: Literal["skip", "first_seen"] = "skip"  # two largest clusters: skip the group, or first seen wins
    train_samples: int | None = None  # online: train on the first m of each group's votes; None = all

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"vote.threshold must be in [0, 1], got {self.threshold}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"vote.train_samples must be >= 1 or null, got {self.train_samples}")


def has_fixed_label(problem: Problem) -> bool:
    """The row's answer is a fixed label (offline use): a pseudo-label (`label_source: vote`) or gold
    mixed in with pseudo-labels (`label_source: gold`); any other row is voted on."""
    return problem.extras.get("label_source") in (LABEL_SOURCE, GOLD_SOURCE) and bool(problem.answer)


def problem_gold(problem: Problem) -> str | None:
    """The gold answer for the audit: `gold_answer` of a vote-labelled row, else the row's answer."""
    is_vote = problem.extras.get("label_source") == LABEL_SOURCE and bool(problem.answer)
    gold = problem.extras.get(GOLD_FIELD) if is_vote else problem.answer
    if gold is None:
        return None
    return str(gold).strip() or None


def pin_vote_label(problem: Problem, verdict: Verdict) -> Problem:
    """`problem` with its group's vote as a fixed (offline) label; unchanged for other verdicts.

    The Phase-1 collector scores a y_init's revisions as their own group; pinning the y_init group's label
    first makes them compare with that label instead of voting among themselves.
    """
    if verdict.vote_ratio is None or verdict.label is None or has_fixed_label(problem):
        return problem
    extras = {**problem.extras, "label_source": LABEL_SOURCE, "vote_ratio": verdict.vote_ratio}
    gold = problem_gold(problem)
    if gold is not None:
        extras[GOLD_FIELD] = gold
    return dataclasses.replace(problem, answer=verdict.label, extras=extras)


@dataclass(frozen=True)
class GroupEvidence:
    """What one group's vote and audit are computed from; independent of tau and of the tie rule."""

    answers: tuple[str | None, ...]  # per response, its extracted answer
    empty: tuple[bool, ...]  # per response, it was empty
    cluster_ids: tuple[int | None, ...]  # online: per response, its cluster; offline: unused (all None)
    gold_correct: tuple[bool, ...] | None  # per response, vs the gold answer; None = no gold
    candidate_correct: bool | None  # the (candidate) label equals the gold answer; None = unknown
    fixed_label: str | None = None  # offline: the row's pseudo-label
    fixed_correct: tuple[bool, ...] | None = None  # offline: per response, vs the pseudo-label
    fixed_ratio: float | None = None  # offline: the vote ratio the labelling stage recorded


def gather_evidence(
    problems: Sequence[Problem], groups: Sequence[Sequence[str]], extraction: str, equivalent: Equivalence
) -> list[GroupEvidence]:
    """Extract, cluster (online rows) and check against gold / pseudo-labels, in batched equivalence calls."""
    answers = [[extract_answer(text, extraction) if text.strip() else None for text in g] for g in groups]
    offline = [has_fixed_label(p) for p in problems]
    online_rows = [i for i, off in enumerate(offline) if not off]
    clusters: dict[int, list[int | None]] = dict(
        zip(online_rows, cluster_answer_groups([answers[i] for i in online_rows], equivalent), strict=True)
    )
    candidates: dict[int, str | None] = {
        i: compute_vote(clusters[i], answers[i], 0.0, "first_seen").label for i in online_rows
    }
    pairs: list[tuple[str, str]] = []
    for i, problem in enumerate(problems):
        label = problem.answer if offline[i] else candidates[i]
        gold = problem_gold(problem)
        if offline[i]:
            pairs += [(label, a) for a in answers[i] if a is not None]
        if gold is not None:
            pairs += [(gold, a) for a in answers[i] if a is not None]
            if label is not None:
                pairs.append((gold, label))
    same = dict(zip(pairs, equivalent(pairs), strict=True)) if pairs else {}
    out = []
    for i, problem in enumerate(problems):
        row, gold = answers[i], problem_gold(problem)
        label = problem.answer if offline[i] else candidates[i]
        out.append(
            GroupEvidence(
                answers=tuple(row),
                empty=tuple(not t.strip() for t in groups[i]),
                cluster_ids=tuple(clusters.get(i, [None] * len(row))),
                gold_correct=None if gold is None else tuple(a is not None and same[(gold, a)] for a in row),
                candidate_correct=None if gold is None or label is None else same[(gold, label)],
                fixed_label=label if offline[i] else None,
                fixed_correct=tuple(a is not None and same[(label, a)] for a in row) if offline[i] else None,
                fixed_ratio=_float_or_none(problem.extras.get("vote_ratio")) if offline[i] else None,
            )
        )
    return out


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _reason(correct: bool, answer: str | None, empty: bool) -> str:
    if empty:
        return "empty_response"
    if answer is None:
        return "no_answer"
    return "correct" if correct else "wrong"


def build_vote_verdicts(evidence: GroupEvidence, vote: VoteConfig) -> list[Verdict]:
    """The verdicts of one group under `vote` (tau, tie rule, trained subset)."""
    gold = evidence.gold_correct or (None,) * len(evidence.answers)
    if evidence.fixed_correct is not None:  # offline: compare with the row's pseudo-label
        return [
            Verdict(
                r,
                a,
                _reason(r, a, e),
                evidence.fixed_label,
                gold_correct=g,
                label_correct=evidence.candidate_correct,
                vote_ratio=evidence.fixed_ratio,
            )
            for r, a, e, g in zip(evidence.fixed_correct, evidence.answers, evidence.empty, gold, strict=True)
        ]
    result = compute_vote(evidence.cluster_ids, evidence.answers, vote.threshold, vote.tie)
    verdicts = []
    for j, (a, c, e, g) in enumerate(
        zip(evidence.answers, evidence.cluster_ids, evidence.empty, gold, strict=True)
    ):
        common = {
            "gold_correct": g,
            "label_correct": evidence.candidate_correct,
            "vote_ratio": result.vote_ratio,
        }
        if result.skip is not None:
            verdicts.append(Verdict(False, a, SKIPPED_REASON, None, skip=result.skip, **common))
            continue
        r = c is not None and c == result.label_cluster
        skip = NOT_TRAINED if vote.train_samples is not None and j >= vote.train_samples else None
        verdicts.append(Verdict(r, a, _reason(r, a, e), result.label, skip=skip, **common))
    return verdicts


class MajorityVoteReward(_Closing):
    """r from the group's own majority vote (online) or the row's pseudo-label (offline); see the module."""

    name = "majority_vote"

    def __init__(
        self, cfg: GradingConfig, vote: VoteConfig | None = None, equivalent: Equivalence | None = None
    ):
        self.cfg = cfg
        self.vote = vote or VoteConfig()
        self._owned = None
        if equivalent is None:
            from self_revision_training.shared.rewards.equivalence import AnswerEquivalence

            equivalent = self._owned = AnswerEquivalence(cfg)
        self._equivalent = equivalent

    def score(self, problems: list[Problem], groups: list[list[str]]) -> list[list[Verdict]]:
        _check_groups(problems, groups)
        single = [
            p.index for p, g in zip(problems, groups, strict=True) if len(g) == 1 and not has_fixed_label(p)
        ]
        if single:  # a one-sample vote has ratio 1: every parsed answer would be "correct"
            raise ValueError(
                f"majority_vote needs >= 2 responses per prompt to vote (problems {single[:5]} have 1): "
                "raise the samples per prompt, or score pseudo-labelled rows (label_source: vote)"
            )
        evidence = gather_evidence(problems, groups, self.cfg.extraction, self._equivalent)
        return [build_vote_verdicts(e, self.vote) for e in evidence]

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


# ----------------------------------------------------------------------------------------------
# audit metrics (gold answers known for some or all groups)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _bucket_name(low: float, high: float) -> str:
    return f"ratio_{low:.2f}_{high:.2f}"  # [low, high), the last bucket [low, 1.0]


def compute_vote_audit(
    groups: Sequence[Sequence[Verdict]],
    bucket_edges: Sequence[float] = DEFAULT_BUCKETS,
    prefix: str = "",
) -> dict[str, float | int | None]:
    """Pseudo-label quality over groups of verdicts (one group per prompt), as one flat dict.

    A group is skipped when its verdicts carry a group skip (VOTE_SKIPS). "Scored" responses are those of
    kept groups with no skip and a known gold grade: their r is what picks P_r. None = no data.

    Args:
        groups: per prompt, the verdicts of its responses (`majority_vote` fills the audit fields).
        bucket_edges: ascending upper edges of the vote-ratio buckets; the last must be 1.0.
        prefix: prepended to every key (e.g. "vote/" for Phase 2's metrics).
    Returns:
        num_groups, num_kept, coverage (kept / groups), skipped/<reason> counts, mean_vote_ratio;
        num_audited (groups with gold), label_accuracy (kept groups with gold: label equals gold);
        num_scored, reward_accuracy (r equals the gold grade), false_positives (r=1, gold wrong: the
        teacher endorses a wrong answer), false_negatives (r=0, gold right), false_positive_rate and
        false_negative_rate (each over the scored responses), gold_accuracy (the responses' own accuracy
        against gold, every group); per bucket <name>/num_groups and <name>/label_accuracy over every group
        with gold and a candidate label, skipped ones included (to choose tau).
    """
    edges = [float(e) for e in bucket_edges]
    if not edges or edges != sorted(edges) or edges[-1] != 1.0 or edges[0] <= 0:
        raise ValueError(f"bucket_edges must ascend from > 0 to 1.0, got {list(bucket_edges)}")
    rows = [list(g) for g in groups if len(g)]
    skipped = {reason: 0 for reason in VOTE_SKIPS}
    kept = [g for g in rows if g[0].skip not in VOTE_SKIPS]
    for g in rows:
        if g[0].skip in VOTE_SKIPS:
            skipped[g[0].skip] += 1
    ratios = [g[0].vote_ratio for g in rows if g[0].vote_ratio is not None]
    audited = [g for g in kept if g[0].label_correct is not None]
    scored = [v for g in kept for v in g if v.skip is None and v.gold_correct is not None]
    fp = sum(v.correct and not v.gold_correct for v in scored)
    fn = sum(not v.correct and v.gold_correct for v in scored)
    graded = [v.gold_correct for g in rows for v in g if v.gold_correct is not None]
    out: dict[str, float | int | None] = {
        "num_groups": len(rows),
        "num_kept": len(kept),
        "coverage": _ratio(len(kept), len(rows)),
        **{f"skipped/{reason}": count for reason, count in skipped.items()},
        "mean_vote_ratio": _ratio(sum(ratios), len(ratios)),
        "num_audited": len(audited),
        "label_accuracy": _ratio(sum(bool(g[0].label_correct) for g in audited), len(audited)),
        "num_scored": len(scored),
        "reward_accuracy": _ratio(sum(v.correct == v.gold_correct for v in scored), len(scored)),
        "false_positives": fp,
        "false_negatives": fn,
        "false_positive_rate": _ratio(fp, len(scored)),
        "false_negative_rate": _ratio(fn, len(scored)),
        "gold_accuracy": _ratio(sum(bool(x) for x in graded), len(graded)),
    }
    candidates = [
        g
        for g in rows
        if g[0].label_correct is not None and g[0].vote_ratio is not None and g[0].vote_ratio > 0
    ]
    low = 0.0
    for b, high in enumerate(edges):
        last = b == len(edges) - 1
        inside = [
            g for g in candidates if low <= g[0].vote_ratio < high or (last and g[0].vote_ratio == high)
        ]
        name = _bucket_name(low, high)
        out[f"{name}/num_groups"] = len(inside)
        out[f"{name}/label_accuracy"] = _ratio(sum(bool(g[0].label_correct) for g in inside), len(inside))
        low = high
    return {prefix + key: value for key, value in out.items()}
