"""Evaluation metrics over graded samples: avg@k with a 95% CI, unbiased pass@k, and maj@k.

Pure Python (no torch, vLLM or Ray); `self_distillation.evaluate` generates and grades the samples and
calls `summarize` on its per-sample records. The protocol follows the reference notes (Sec. 6): the
original code has no benchmark evaluation, only avg@8 on AIME-2024 during training, so this project
reports avg@k (mean accuracy over the k = n samples of each problem), pass@k with the unbiased estimator
of Chen et al. (2021, "Evaluating Large Language Models Trained on Code", Eq. 1) and maj@k, under fixed,
recorded decoding settings and the training prompt template. maj@k clusters the answers by an
equivalence passed in (`evaluate` passes math-verify's), so equivalent forms ("0.5", "1/2") vote together.

    summary = summarize(records, ks=[1, 4])   # records: dicts as written to samples.jsonl

Confidence interval of avg@k: samples of one problem are correlated (an easy problem is solved by most
of its samples), so the problem, not the sample, is the unit: each problem's mean accuracy over its n
samples is one observation, and the interval is mean +- 1.96 * s / sqrt(P), with s the sample standard
deviation (ddof=1) of the P per-problem means (normal approximation; clustered by problem). With P=1
there is no spread to estimate and the interval is None.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from self_revision_training.shared.answers import (
    Equivalence,
    cluster_answer_groups,
    string_equivalence,
    vote_key,
)

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class AvgAtK:
    mean: float  # mean over problems of the per-problem mean accuracy
    ci_low: float | None  # 95% normal-approximation interval; None when num_problems < 2
    ci_high: float | None
    stderr: float | None  # sample std of the per-problem means / sqrt(num_problems)
    num_problems: int
    k: int  # samples per problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids huge binomials.

    Args:
        n: samples drawn for the problem (>= k).
        c: how many of them are correct (0 <= c <= n).
        k: the budget being estimated (>= 1).
    Returns:
        The probability that at least one of k samples drawn without replacement from the n is correct.
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if n < k:
        raise ValueError(f"pass@k needs n >= k samples, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[Sequence[bool]]) -> AvgAtK:
    """Mean accuracy over each problem's samples, averaged over problems, with a 95% CI.

    Args:
        correct: one row per problem, one bool per sample; every row has the same length k >= 1.
    Returns:
        AvgAtK; the interval is mean +- 1.96 * std(per-problem means, ddof=1) / sqrt(P), None for P=1.
    """
    if not correct:
        raise ValueError("avg@k needs at least one problem")
    k = len(correct[0])
    if k < 1 or any(len(row) != k for row in correct):
        raise ValueError("avg@k needs the same number (>= 1) of samples for every problem")
    per_problem = [sum(bool(x) for x in row) / k for row in correct]
    num = len(per_problem)
    mean = sum(per_problem) / num
    if num < 2:
        return AvgAtK(mean, None, None, None, num, k)
    var = sum((m - mean) ** 2 for m in per_problem) / (num - 1)
    stderr = math.sqrt(var / num)
    return AvgAtK(mean, mean - Z_95 * stderr, mean + Z_95 * stderr, stderr, num, k)


def normalize_vote(answer: str | None) -> str | None:
    """The exact-match key a sample votes with: its extracted answer without whitespace; None = no vote."""
    return vote_key(answer)


def _majority_cluster(cluster_ids: Sequence[int | None]) -> int | None:
    """The winning cluster among the votes (most members; a tie goes to the first seen); None = no votes."""
    sizes = Counter(c for c in cluster_ids if c is not None)
    if not sizes:
        return None
    first = {c: cluster_ids.index(c) for c in sizes}
    return max(sizes, key=lambda c: (sizes[c], -first[c]))


def majority_vote_correct(
    answers: Sequence[str | None], correct: Sequence[bool], equivalent: Equivalence | None = None
) -> bool:
    """Whether one problem's majority answer is right.

    Answers are clustered by `equivalent` (math-verify equivalence in `evaluate`; default: equal text
    without whitespace), so "0.5", "\\frac{1}{2}" and "1/2" vote together. Samples with no extracted
    answer do not vote; the largest cluster wins, a tie goes to the cluster seen first; the result is the
    grade of the first sample of the winning cluster (grades of equivalent answers agree unless a grader
    timed out). No votes at all is incorrect.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} grades")
    ids = cluster_answer_groups([list(answers)], equivalent or string_equivalence)[0]
    return _correct_of_majority(ids, correct)


def _correct_of_majority(cluster_ids: Sequence[int | None], correct: Sequence[bool]) -> bool:
    winner = _majority_cluster(cluster_ids)
    return winner is not None and bool(correct[list(cluster_ids).index(winner)])


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    k: int,
    equivalent: Equivalence | None = None,
) -> float:
    """Majority-vote accuracy over the first k samples of each problem, averaged over problems.

    Args:
        answers: per problem, the extracted answer of each sample (None = none extracted).
        correct: per problem, the grade of each sample (same shape as `answers`).
        k: samples that vote (each problem needs >= k).
        equivalent: batched answer equivalence (`answers.Equivalence`); None = equal text.
    """
    if not answers or len(answers) != len(correct):
        raise ValueError("maj@k needs one row of answers and one of grades per problem (>= 1 problem)")
    if k < 1 or any(len(row) < k for row in answers):
        raise ValueError(f"maj@k needs 1 <= k <= samples per problem, got k={k}")
    return _maj_at_k_from_clusters(
        cluster_answer_groups([list(a[:k]) for a in answers], equivalent or string_equivalence), correct, k
    )


def _maj_at_k_from_clusters(
    cluster_ids: Sequence[Sequence[int | None]], correct: Sequence[Sequence[bool]], k: int
) -> float:
    # Clustering is first-seen greedy, so the clusters of the first k samples are a prefix of the
    # clusters of all n: one clustering pass serves every k.
    hits = [_correct_of_majority(ids[:k], c[:k]) for ids, c in zip(cluster_ids, correct, strict=True)]
    return sum(hits) / len(hits)


def group_by_problem(records: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Records grouped by `problem_index`, each group ordered by `sample_index` (checked 0..n-1)."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(int(r["problem_index"]), []).append(r)
    for index, rows in groups.items():
        rows.sort(key=lambda r: int(r["sample_index"]))
        if [int(r["sample_index"]) for r in rows] != list(range(len(rows))):
            raise ValueError(f"problem {index}: sample indices are not 0..{len(rows) - 1}")
    return groups


def summarize(
    records: Sequence[dict[str, Any]],
    ks: Sequence[int],
    majority: bool = True,
    equivalent: Equivalence | None = None,
) -> dict[str, Any]:
    """Aggregate per-sample records (samples.jsonl) into the evaluation summary.

    Args:
        records: dicts with problem_index, sample_index, correct, extracted, num_tokens, finish_reason,
            reason; every problem must have the same number n of samples.
        ks: budgets for pass@k and maj@k; those above n are left out and listed in `ks_omitted`.
        majority: compute maj@k (math answers); False for code, whose `extracted` is no answer.
        equivalent: answer equivalence for maj@k's clusters (`evaluate` passes math-verify's,
            `rewards.equivalence.AnswerEquivalence`); None = equal text without whitespace.
    Returns:
        num_problems, num_samples, samples_per_problem, avg@k {k, mean, ci_low, ci_high, stderr},
        pass@k and maj@k ({str(k): value}), ks_omitted, mean_response_tokens, truncation_rate,
        grade_reasons ({reason: count}).
    """
    if not records:
        raise ValueError("no samples to summarize")
    groups = group_by_problem(records)
    sizes = {len(rows) for rows in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"problems have different numbers of samples: {sorted(sizes)}")
    n = sizes.pop()
    rows = [groups[i] for i in sorted(groups)]
    correct = [[bool(r["correct"]) for r in group] for group in rows]
    answers = [[r.get("extracted") for r in group] for group in rows]
    avg = avg_at_k(correct)
    kept = sorted({int(k) for k in ks if 1 <= int(k) <= n})
    pass_k = {str(k): sum(pass_at_k(n, sum(row), k) for row in correct) / len(correct) for k in kept}
    maj_k = {}
    if majority and kept:
        clusters = cluster_answer_groups(answers, equivalent or string_equivalence)
        maj_k = {str(k): _maj_at_k_from_clusters(clusters, correct, k) for k in kept}
    return {
        "num_problems": len(rows),
        "num_samples": len(records),
        "samples_per_problem": n,
        "avg@k": {
            "k": n,
            "mean": avg.mean,
            "ci_low": avg.ci_low,
            "ci_high": avg.ci_high,
            "stderr": avg.stderr,
        },
        "pass@k": pass_k,
        "maj@k": maj_k,
        "ks_omitted": sorted({int(k) for k in ks} - set(kept)),
        "mean_response_tokens": sum(int(r["num_tokens"]) for r in records) / len(records),
        "truncation_rate": sum(r["finish_reason"] == "length" for r in records) / len(records),
        "grade_reasons": dict(sorted(Counter(str(r["reason"]) for r in records).items())),
    }
