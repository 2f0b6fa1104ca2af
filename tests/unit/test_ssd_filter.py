"""SSD filter golden test: 20 samples with known lengths, vs ml-ssd's rule worked out by hand."""

from __future__ import annotations

import random

import pytest

from self_revision_training.ssd_filter import FILTER_ORDER, compute_length_cutoff, filter_ssd_samples

# (text, finish_reason); lengths are of the stripped text, as in ml-ssd.
SAMPLES = [
    ("", "stop"),  # 0  empty
    ("   \n", "stop"),  # 1  empty after strip (raw length 4)
    ("", "length"),  # 2  empty and truncated: counted as empty (first filter)
    ("a" * 5, "stop"),  # 3  len 5
    ("b" * 10, "stop"),  # 4  len 10
    ("c" * 2, "length"),  # 5  len 2, truncated
    ("d" * 30, "stop"),  # 6  len 30
    ("e" * 10, "stop"),  # 7  len 10
    ("  fff     ", "stop"),  # 8  len 3 stripped (raw 10)
    ("g" * 50, "length"),  # 9  len 50, truncated
    ("h" * 10, "stop"),  # 10 len 10
    ("i" * 100, "stop"),  # 11 len 100
    ("\njjjjj  ", "stop"),  # 12 len 5 stripped (raw 8)
    ("k" * 7, "length"),  # 13 len 7, truncated
    ("l" * 40, "stop"),  # 14 len 40
    ("m" * 25, "stop"),  # 15 len 25
    ("n" * 60, "length"),  # 16 len 60, truncated
    ("o" * 12, "stop"),  # 17 len 12
    ("p" * 10, "stop"),  # 18 len 10
    ("q" * 200, "length"),  # 19 len 200, truncated
]
TEXTS = [t for t, _ in SAMPLES]
REASONS = [r for _, r in SAMPLES]
NON_EMPTY = list(range(3, 20))
TRUNCATED = [5, 9, 13, 16, 19]


def _report(empty, truncated, shortest, kept, cutoff):
    return {
        "input": 20,
        "empty": empty,
        "truncated": truncated,
        "shortest": shortest,
        "kept": kept,
        "cutoff_chars": cutoff,
    }


def test_ml_ssd_rule_without_truncation_filter():
    # 17 non-empty, sorted lengths [2, 3, 5, 5, 7, 10, 10, 10, 10, 12, 25, 30, 40, 50, 60, 100, 200];
    # int(17 * 10 / 100) = 1 -> cutoff 3: drops #5 (len 2); #8 (len 3, the tie) is kept; truncated kept.
    kept, report = filter_ssd_samples(TEXTS, REASONS)
    assert kept == [i for i in NON_EMPTY if i != 5]
    assert report == _report(3, 0, 1, 16, 3)


def test_with_truncation_filter_cutoff_over_what_remains():
    # After empty and truncated: 12 samples, sorted [3, 5, 5, 10, 10, 10, 10, 12, 25, 30, 40, 100];
    # int(12 * 10 / 100) = 1 -> cutoff 5: drops #8 (stripped len 3, raw 10); ties #3, #12 are kept.
    kept, report = filter_ssd_samples(TEXTS, REASONS, drop_truncated=True)
    assert kept == [3, 4, 6, 7, 10, 11, 12, 14, 15, 17, 18]
    assert report == _report(3, 5, 1, 11, 5)


def test_shortest_filter_off():
    kept, report = filter_ssd_samples(TEXTS, REASONS, shortest_percent=0)
    assert kept == NON_EMPTY
    assert report == _report(3, 0, 0, 17, 0)
    kept, report = filter_ssd_samples(TEXTS, REASONS, drop_truncated=True, shortest_percent=0)
    assert kept == [i for i in NON_EMPTY if i not in TRUNCATED]
    assert report == _report(3, 5, 0, 12, 0)


def test_larger_percent_with_ties_at_the_cutoff():
    # int(17 * 30 / 100) = 5 -> sorted[5] = 10: drops lengths 2, 3, 5, 5, 7; all four 10s are kept.
    kept, report = filter_ssd_samples(TEXTS, REASONS, shortest_percent=30)
    assert kept == [4, 6, 7, 9, 10, 11, 14, 15, 16, 17, 18, 19]
    assert report == _report(3, 0, 5, 12, 10)


def test_empty_filter_off_lets_empties_set_the_cutoff():
    # 20 lengths [0, 0, 0, 2, 3, ...]: int(20 * 10 / 100) = 2 -> cutoff 0, nothing is dropped.
    kept, report = filter_ssd_samples(TEXTS, REASONS, drop_empty=False)
    assert kept == list(range(20))
    assert report == _report(0, 0, 0, 20, 0)
    # At 20 %: index 4 -> cutoff 3: drops the three empties and #5.
    kept, report = filter_ssd_samples(TEXTS, REASONS, drop_empty=False, shortest_percent=20)
    assert kept == [i for i in range(20) if i not in (0, 1, 2, 5)]
    assert report == _report(0, 0, 4, 16, 3)


def test_cutoff_formula_and_edges():
    assert compute_length_cutoff([], 10) == 0
    assert compute_length_cutoff([4, 1, 9], 0) == 0
    assert compute_length_cutoff([7], 10) == 7  # n - 1 clamp
    assert compute_length_cutoff([5, 1, 3], 99) == 5  # int(2.97) = 2
    assert compute_length_cutoff(list(range(100)), 57) == 57  # percent form: int(100 * 57 / 100.0)
    assert FILTER_ORDER == ("empty", "truncated", "shortest")
    assert filter_ssd_samples([], None) == ([], _report(0, 0, 0, 0, 0) | {"input": 0})


def test_invalid_arguments():
    with pytest.raises(ValueError):
        filter_ssd_samples(TEXTS, None, drop_truncated=True)
    with pytest.raises(ValueError):
        filter_ssd_samples(TEXTS, REASONS[:-1])
    with pytest.raises(ValueError):
        filter_ssd_samples(["x"], ["abort"])
    with pytest.raises(ValueError):
        filter_ssd_samples(TEXTS, REASONS, shortest_percent=100)


def test_random_samples_counts_add_up_and_match_a_direct_reading():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        texts = [" " * rng.randint(0, 2) + "x" * rng.choice([0, 0, 1, 3, 5, 8, 8, 20]) for _ in range(n)]
        reasons = [rng.choice(["stop", "length", None]) for _ in range(n)]
        drop_truncated = rng.random() < 0.5
        percent = rng.choice([0, 10, 25])
        kept, report = filter_ssd_samples(
            texts, reasons, drop_truncated=drop_truncated, shortest_percent=percent
        )
        pool = [i for i in range(n) if texts[i].strip() and not (drop_truncated and reasons[i] == "length")]
        lengths = sorted(len(texts[i].strip()) for i in pool)
        cutoff = (
            lengths[min(int(len(lengths) * percent / 100.0), len(lengths) - 1)] if percent and pool else 0
        )
        assert kept == [i for i in pool if len(texts[i].strip()) >= cutoff]
        assert report["empty"] + report["truncated"] + report["shortest"] + report["kept"] == n
        assert report["cutoff_chars"] == cutoff
