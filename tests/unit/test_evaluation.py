"""Evaluation metrics against hand-computed values: pass@k, avg@k with its CI, maj@k, summarize, table."""

from __future__ import annotations

import math
import subprocess
import sys
from itertools import combinations

import pytest

from self_distillation.evaluation import (
    Z_95,
    avg_at_k,
    maj_at_k,
    majority_vote_correct,
    pass_at_k,
    summarize,
)
from self_distillation.report import format_table

# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 0, 1, 0.0),
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (4, 4, 4, 1.0),
        (4, 1, 4, 1.0),  # n - c < k: every 4-subset holds the correct one
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (16, 1, 8, 0.5),  # 1 - C(15,8)/C(16,8) = 1 - 8/16
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_subset_enumeration():
    # the definition: the share of k-subsets of the n samples that hold a correct one
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------- avg@k


def test_avg_at_k_and_ci_hand_computed():
    # per-problem means 1, 0.5, 0, 0.5 -> mean 0.5; deviations 0.5, 0, -0.5, 0 -> sum of squares 0.5;
    # sample variance 0.5 / 3 = 1/6; std 0.408248; stderr 0.408248 / sqrt(4) = 0.2041241;
    # half-width 1.959964 * 0.2041241 = 0.400076 -> CI [0.099924, 0.900076]
    result = avg_at_k([[True, True], [True, False], [False, False], [False, True]])
    assert result.mean == 0.5 and result.k == 2 and result.num_problems == 4
    assert result.stderr == pytest.approx(math.sqrt(1 / 6) / 2)
    assert result.ci_low == pytest.approx(0.099924, abs=1e-6)
    assert result.ci_high == pytest.approx(0.900076, abs=1e-6)
    assert result.ci_high - result.mean == pytest.approx(Z_95 * result.stderr)


def test_avg_at_k_single_problem_has_no_interval():
    result = avg_at_k([[True, False, False, False]])
    assert result.mean == 0.25
    assert result.ci_low is None and result.ci_high is None and result.stderr is None


def test_avg_at_k_all_equal_problems_have_zero_width():
    result = avg_at_k([[True, False]] * 3)
    assert result.ci_low == result.ci_high == result.mean == 0.5


def test_avg_at_k_rejects_ragged_or_empty_input():
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], [True, False]])


# ---------------------------------------------------------------- maj@k


def test_majority_vote_picks_the_most_common_answer():
    assert majority_vote_correct(["3", "5", "5"], [False, True, True])
    assert not majority_vote_correct(["5", "3", "3"], [True, False, False])


def test_majority_vote_tie_goes_to_first_occurrence():
    assert majority_vote_correct(["5", "3", "3", "5"], [True, False, False, True])
    assert not majority_vote_correct(["3", "5", "5", "3"], [False, True, True, False])


def test_majority_vote_ignores_samples_without_an_answer():
    # two samples have no answer; of the rest "7" wins 2 to 1
    assert majority_vote_correct([None, "7", None, "7", "2"], [False, True, False, True, False])
    assert not majority_vote_correct([None, None], [False, False])  # no votes at all: incorrect
    assert not majority_vote_correct(["  "], [False])  # a blank extraction is no vote


def test_majority_vote_compares_answers_without_whitespace():
    assert majority_vote_correct(["1", "\\frac{1}{2}", "\\frac {1}{2}"], [False, True, True])


def test_majority_vote_uses_the_grade_of_the_first_winning_sample():
    # equal answers graded differently (e.g. a grader timeout): the first carrier's grade counts
    assert not majority_vote_correct(["4", "4"], [False, True])


def test_maj_at_k_uses_the_first_k_samples():
    answers = [["1", "2", "2"], [None, "9", "9"]]
    correct = [[True, False, False], [False, True, True]]
    assert maj_at_k(answers, correct, 1) == 0.5  # "1" right; no vote wrong
    assert maj_at_k(answers, correct, 2) == 1.0  # tie -> "1" right; "9" (None does not vote) right
    assert maj_at_k(answers, correct, 3) == 0.5  # "2" wins 2:1, wrong; "9" right
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, 4)


# ---------------------------------------------------------------- summarize


def _records():
    # problem 0: grades T F T F, answers 2 3 2 3           -> c=2; maj@1 T, maj@2 tie->"2" T, maj@4 tie->"2" T
    # problem 5: grades F T F F, answers - 1 7 7           -> c=1; maj@1 no vote F, maj@2 "1" T, maj@4 "7" F
    # problem 9: grades F F F F, no answers                -> c=0; every maj F
    spec = {
        0: ([True, False, True, False], ["2", "3", "2", "3"]),
        5: ([False, True, False, False], [None, "1", "7", "7"]),
        9: ([False] * 4, [None] * 4),
    }
    records = []
    for index, (grades, answers) in spec.items():
        for k, (ok, answer) in enumerate(zip(grades, answers, strict=True)):
            reason = "correct" if ok else ("no_answer" if answer is None else "wrong")
            records.append(
                {
                    "problem_index": index,
                    "sample_index": k,
                    "correct": ok,
                    "extracted": answer,
                    "num_tokens": 10 * (k + 1),  # 10, 20, 30, 40 per problem
                    "finish_reason": "length" if answer is None else "stop",
                    "reason": reason,
                }
            )
    return records


def test_summarize_end_to_end_hand_computed():
    records = _records()
    summary = summarize(list(reversed(records)), ks=[4, 1, 2, 8])  # order of records does not matter
    assert (
        summary["num_problems"] == 3 and summary["num_samples"] == 12 and summary["samples_per_problem"] == 4
    )
    # avg@4: per-problem means 0.5, 0.25, 0 -> 0.25; std 0.25 -> stderr 0.25/sqrt(3)
    avg = summary["avg@k"]
    assert avg["k"] == 4 and avg["mean"] == pytest.approx(0.25)
    half = Z_95 * 0.25 / math.sqrt(3)
    assert avg["ci_low"] == pytest.approx(0.25 - half) and avg["ci_high"] == pytest.approx(0.25 + half)
    # pass@1 = mean(c/n) = (0.5 + 0.25 + 0) / 3; pass@2 = (1 - 1/6, 1 - 3/6, 0) / 3; pass@4 = (1, 1, 0) / 3
    assert summary["pass@k"] == pytest.approx({"1": 0.25, "2": 4 / 9, "4": 2 / 3})
    assert summary["maj@k"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "4": 1 / 3})
    assert summary["ks_omitted"] == [8]
    assert summary["mean_response_tokens"] == 25.0
    assert summary["truncation_rate"] == pytest.approx(5 / 12)  # 1 + 4 samples without an answer
    assert summary["grade_reasons"] == {"correct": 3, "no_answer": 5, "wrong": 4}
    assert summarize(records, ks=[1], majority=False)["maj@k"] == {}


def test_summarize_rejects_inconsistent_records():
    records = _records()
    with pytest.raises(ValueError, match="different numbers"):
        summarize(records[:-1], ks=[1])
    with pytest.raises(ValueError, match="sample indices"):
        summarize([{**records[0], "sample_index": 3}, *records[1:4]], ks=[1])
    with pytest.raises(ValueError, match="no samples"):
        summarize([], ks=[1])


# ---------------------------------------------------------------- report table


def test_format_table_renders_aligned_rows():
    base = summarize(_records(), ks=[1, 4])
    one = {**summarize(_records()[:4], ks=[1]), "label": "single"}  # one problem: no CI, no pass@4
    table = format_table([{**base, "label": "base"}, one])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # fixed width
    header = lines[0].split()
    assert header[:6] == ["model", "problems", "n", "avg@4", "(95%", "CI)"]
    assert header[6:] == ["pass@1", "pass@4", "maj@1", "maj@4", "len", "trunc"]
    half = 100 * Z_95 * 0.25 / math.sqrt(3)
    assert lines[2].split() == ["base", "3", "4", "25.0", "±", f"{half:.1f}", "25.0", "66.7", "33.3", "33.3",
                                "25", "41.7"]  # fmt: skip
    assert lines[3].split() == ["single", "1", "4", "50.0", "50.0", "-", "100.0", "-", "25", "0.0"]


def test_a_temperature_sweep_gets_a_temperature_column():
    rows = [{**summarize(_records(), ks=[1]), "label": "m", "decoding": {"temperature": t}} for t in (0.0, 0.6)]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:4] == ["model", "problems", "n", "T"]
    assert [line.split()[3] for line in lines[2:]] == ["0", "0.6"]
    same = format_table([rows[0], {**rows[1], "decoding": {"temperature": 0.0}}])
    assert "T" not in same.splitlines()[0].split()  # one temperature: no column (tables stay as they were)


def test_evaluation_core_imports_without_heavy_deps():
    probe = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('vllm', 'ray', 'torch', 'transformers'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import self_distillation.evaluation, self_distillation.report\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
