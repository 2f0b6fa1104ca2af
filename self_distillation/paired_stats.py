"""Paired statistics of two methods evaluated on the same problems (the unit is the problem).

Pure numpy. Per-problem accuracy = the mean correctness over each problem's k samples; methods are aligned
by `problem_index` and must share the problem set and k.
- delta = B - A: the mean over problems of acc_B(p) - acc_A(p).
- paired bootstrap 95% interval: resample problems with replacement (the same problems for A and B),
  `num_bootstrap` times with a seeded generator; percentile interval (inverted-CDF 2.5% / 97.5% quantiles
  of the resampled mean deltas), Efron & Tibshirani (1993, "An Introduction to the Bootstrap", Ch. 13).
- two-sided p-value: paired sign-flip permutation test of H0 "A and B are exchangeable within each
  problem" (each delta's sign is + or - with probability 1/2), statistic |sum of deltas|; exact over all
  2^m sign vectors of the m non-zero deltas when m <= `exact_max_nonzero` (16 -> 65,536 vectors), else
  `num_permutations` Monte Carlo sign vectors with the +1 correction p = (1 + hits) / (1 + R)
  (Phipson & Smyth 2010, "Permutation P-values Should Never Be Zero"). Zero deltas carry no sign.
- unpaired interval of each method: mean +- 1.96 * s / sqrt(P) (evaluation.avg_at_k); two overlapping
  unpaired intervals do not mean "no difference" when the paired interval excludes 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from self_distillation.evaluation import Z_95, group_by_problem

SAMPLES_FILE = "samples.jsonl"  # as written by self_distillation.evaluate
SUMMARY_FILE = "summary.json"  # the evaluation's summary (read by comparison.py)
TIE_TOLERANCE = 1e-9  # |permuted sum| >= |observed sum| - tol counts as a hit (float sums of c/k values)
_CHUNK = 1024  # resamples drawn per numpy batch (bounds memory at _CHUNK * P indices)


@dataclass(frozen=True)
class PerProblemAccuracy:
    problem_indices: tuple[int, ...]  # sorted problem_index values
    accuracy: tuple[float, ...]  # mean correctness over the problem's samples, same order
    samples_per_problem: int  # k, the same for every problem
    source: str  # where the samples came from (an evaluation dir), named in alignment errors


@dataclass(frozen=True)
class UnpairedInterval:
    mean: float  # mean per-problem accuracy
    ci_low: float | None  # mean - 1.96 * s / sqrt(P); None when P < 2
    ci_high: float | None


@dataclass(frozen=True)
class PairedDifference:
    label_a: str  # the method subtracted (base or reference)
    label_b: str
    num_problems: int
    mean_delta: float  # mean over problems of acc_B - acc_A, in [-1, 1]
    ci_low: float  # paired bootstrap percentile interval of mean_delta
    ci_high: float
    p_value: float  # two-sided paired sign-flip permutation test
    permutation: Literal["exact", "monte_carlo"]
    num_nonzero: int  # m: problems whose delta is not 0
    num_sign_vectors: int  # 2^m when exact, num_permutations when Monte Carlo
    num_bootstrap: int
    seed: int
    unpaired_a: UnpairedInterval
    unpaired_b: UnpairedInterval
    unpaired_overlap: bool  # the two unpaired 95% intervals overlap (or either is undefined)
    paired_excludes_zero: bool  # 0 lies outside [ci_low, ci_high]


# ---------------------------------------------------------------- per-problem accuracy


def compute_per_problem_accuracy(records: Sequence[dict[str, Any]], source: str = "") -> PerProblemAccuracy:
    """Mean correctness of each problem's samples (records as in samples.jsonl).

    Args:
        records: dicts with problem_index, sample_index (0..k-1 per problem) and correct.
        source: a name for the records (an evaluation dir), used in error messages.
    Returns:
        PerProblemAccuracy ordered by problem_index; raises ValueError when problems differ in k.
    """
    if not records:
        raise ValueError(f"{source or 'records'}: no samples")
    groups = group_by_problem(records)
    sizes = {len(rows) for rows in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"{source or 'records'}: problems have different numbers of samples {sorted(sizes)}")
    k = sizes.pop()
    order = sorted(groups)
    accuracy = tuple(sum(bool(r["correct"]) for r in groups[i]) / k for i in order)
    return PerProblemAccuracy(tuple(order), accuracy, k, source)


def load_per_problem_accuracy(eval_dir: str | Path) -> PerProblemAccuracy:
    """Per-problem accuracy from an evaluation directory's samples.jsonl."""
    path = Path(eval_dir) / SAMPLES_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    return compute_per_problem_accuracy([json.loads(line) for line in lines if line.strip()], str(eval_dir))


def align_per_problem(runs: Mapping[str, PerProblemAccuracy]) -> dict[str, np.ndarray]:
    """Accuracy vectors of several methods, checked to cover the same problems with the same k.

    Returns:
        {label: float array [P]} in the shared problem_index order; ValueError naming both sources when
        two methods differ in problem set or samples per problem.
    """
    items = list(runs.items())
    if not items:
        return {}
    first_label, first = items[0]
    for label, run in items[1:]:
        names = f"{first_label!r} ({first.source or 'records'}) and {label!r} ({run.source or 'records'})"
        if run.problem_indices != first.problem_indices:
            only_a = sorted(set(first.problem_indices) - set(run.problem_indices))
            only_b = sorted(set(run.problem_indices) - set(first.problem_indices))
            raise ValueError(
                f"{names} were evaluated on different problem sets ({len(first.problem_indices)} vs "
                f"{len(run.problem_indices)} problems; only in the first: {only_a[:10]}, only in the "
                f"second: {only_b[:10]}); paired comparison needs the same problems"
            )
        if run.samples_per_problem != first.samples_per_problem:
            raise ValueError(
                f"{names} were evaluated with different samples per problem "
                f"({first.samples_per_problem} vs {run.samples_per_problem})"
            )
    return {label: np.asarray(run.accuracy, dtype=np.float64) for label, run in items}


# ---------------------------------------------------------------- paired statistics


def compute_unpaired_interval(accuracy: Sequence[float] | np.ndarray) -> UnpairedInterval:
    """Mean +- 1.96 * s / sqrt(P) of per-problem accuracies (s with ddof=1), as avg@k in evaluation.py."""
    values = np.asarray(accuracy, dtype=np.float64)
    if values.size == 0:
        raise ValueError("an interval needs at least one problem")
    mean = float(values.mean())
    if values.size < 2:
        return UnpairedInterval(mean, None, None)
    half = Z_95 * float(values.std(ddof=1)) / math.sqrt(values.size)
    return UnpairedInterval(mean, mean - half, mean + half)


def compute_paired_bootstrap_interval(
    deltas: Sequence[float] | np.ndarray, num_bootstrap: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean delta, resampling problems with replacement.

    Args:
        deltas: per-problem differences acc_B - acc_A, [P].
        num_bootstrap: resamples drawn (each picks P problems uniformly with replacement).
        seed: numpy Generator seed; the same seed gives the same interval.
        confidence: coverage; the bounds are the (1-c)/2 and (1+c)/2 inverted-CDF quantiles (each bound
            is one of the resampled means, no interpolation).
    Returns:
        (low, high).
    """
    values = np.asarray(deltas, dtype=np.float64)
    if values.size == 0 or num_bootstrap < 1 or not 0 < confidence < 1:
        raise ValueError("the bootstrap needs >= 1 problem, num_bootstrap >= 1 and 0 < confidence < 1")
    rng = np.random.default_rng(seed)
    means = np.empty(num_bootstrap)
    for start in range(0, num_bootstrap, _CHUNK):
        size = min(_CHUNK, num_bootstrap - start)
        means[start : start + size] = values[rng.integers(0, values.size, size=(size, values.size))].mean(1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(low), float(high)


def compute_sign_flip_p_value(
    deltas: Sequence[float] | np.ndarray,
    exact_max_nonzero: int = 16,
    num_permutations: int = 10_000,
    seed: int = 0,
) -> tuple[float, Literal["exact", "monte_carlo"], int]:
    """Two-sided paired sign-flip permutation test of mean delta = 0, statistic |sum of deltas|.

    Args:
        deltas: per-problem differences, [P]; zeros are dropped (a zero has no sign to flip).
        exact_max_nonzero: enumerate all 2^m sign vectors when the m non-zero deltas are at most this many.
        num_permutations: Monte Carlo sign vectors otherwise; p = (1 + hits) / (1 + num_permutations).
        seed: numpy Generator seed of the Monte Carlo test.
    Returns:
        (p_value, "exact" | "monte_carlo", number of sign vectors); p = 1 when every delta is 0.
    """
    values = np.asarray(deltas, dtype=np.float64)
    nonzero = values[np.abs(values) > TIE_TOLERANCE]
    m = int(nonzero.size)
    if m == 0:
        return 1.0, "exact", 1
    threshold = abs(float(nonzero.sum())) - TIE_TOLERANCE
    if m <= exact_max_nonzero:
        bits = (np.arange(2**m, dtype=np.int64)[:, None] >> np.arange(m)) & 1  # [2^m, m]
        sums = (1 - 2 * bits) @ nonzero
        return float(np.count_nonzero(np.abs(sums) >= threshold)) / 2**m, "exact", 2**m
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, num_permutations, _CHUNK):
        size = min(_CHUNK, num_permutations - start)
        signs = 1 - 2 * rng.integers(0, 2, size=(size, m))
        hits += int(np.count_nonzero(np.abs(signs @ nonzero) >= threshold))
    return (1 + hits) / (1 + num_permutations), "monte_carlo", num_permutations


def _intervals_overlap(a: UnpairedInterval, b: UnpairedInterval) -> bool:
    """Whether two unpaired intervals share a point; an undefined interval (P < 2) counts as overlapping."""
    if a.ci_low is None or a.ci_high is None or b.ci_low is None or b.ci_high is None:
        return True
    return a.ci_low <= b.ci_high and b.ci_low <= a.ci_high


def compute_paired_difference(
    accuracy_a: Sequence[float] | np.ndarray,
    accuracy_b: Sequence[float] | np.ndarray,
    label_a: str = "A",
    label_b: str = "B",
    num_bootstrap: int = 10_000,
    num_permutations: int = 10_000,
    exact_max_nonzero: int = 16,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison B - A over the same problems (aligned per-problem accuracies, each [P]).

    The interval is the paired bootstrap percentile interval, the p-value the two-sided sign-flip
    permutation test (see the module docstring); the unpaired 95% intervals of A and B come along.
    """
    a = np.asarray(accuracy_a, dtype=np.float64)
    b = np.asarray(accuracy_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired comparison needs two equal-length vectors, got {a.shape} and {b.shape}")
    deltas = b - a
    low, high = compute_paired_bootstrap_interval(deltas, num_bootstrap, seed)
    p_value, method, vectors = compute_sign_flip_p_value(deltas, exact_max_nonzero, num_permutations, seed)
    ua, ub = compute_unpaired_interval(a), compute_unpaired_interval(b)
    overlap = _intervals_overlap(ua, ub)
    return PairedDifference(
        label_a, label_b, int(a.size), float(deltas.mean()), low, high, p_value, method,
        int(np.count_nonzero(np.abs(deltas) > TIE_TOLERANCE)), vectors, num_bootstrap, seed,
        ua, ub, bool(overlap), bool(low > 0 or high < 0),
    )  # fmt: skip
