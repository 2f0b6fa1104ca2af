"""Method comparison against hand-computed values: paired bootstrap, sign-flip p-values, table, curves."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from self_distillation.comparison import (
    CurvePoint,
    build_comparison,
    extract_curve_points,
    failed_method_run,
    format_comparison_markdown,
    format_comparison_text,
    format_delta,
    load_method_run,
    plot_sample_efficiency,
)
from self_distillation.evaluation import Z_95, summarize
from self_distillation.paired_stats import (
    align_per_problem,
    compute_paired_bootstrap_interval,
    compute_paired_difference,
    compute_per_problem_accuracy,
    compute_sign_flip_p_value,
    compute_unpaired_interval,
    load_per_problem_accuracy,
)

# Case (a): 12 problems, k = 8. Method A's per-problem accuracies (in eighths) spread widely, so each
# unpaired interval is wide; B beats A by one sample on 9 problems, loses one on 1, ties on 2.
A_EIGHTHS = [0, 1, 2, 3, 4, 5, 6, 7, 0, 2, 4, 6]
DELTA_EIGHTHS = [1, 1, 1, 1, 1, 1, 1, 1, 1, -1, 0, 0]
B_EIGHTHS = [a + d for a, d in zip(A_EIGHTHS, DELTA_EIGHTHS, strict=True)]


def write_eval_dir(path: Path, label: str, eighths: list[int], problems: list[int] | None = None, k: int = 8):
    """An evaluation dir as `evaluate` writes it: problem i has `eighths[i]` correct samples out of k."""
    problems = list(range(len(eighths))) if problems is None else problems
    records = [
        {"problem_index": p, "sample_index": s, "correct": s < c, "extracted": "1" if s < c else "2",
         "num_tokens": 10 + s, "finish_reason": "length" if s == 0 else "stop", "reason": "ok"}
        for p, c in zip(problems, eighths, strict=True)
        for s in range(k)
    ]  # fmt: skip
    path.mkdir(parents=True)
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(records)))
    (path / "summary.json").write_text(json.dumps({"label": label, **summarize(records, [1, k])}))
    return path


# ---------------------------------------------------------------- per-problem accuracy and alignment


def test_per_problem_accuracy_from_samples_jsonl(tmp_path):
    run = load_per_problem_accuracy(write_eval_dir(tmp_path / "e", "m", [3, 8, 0], problems=[7, 2, 5]))
    assert run.problem_indices == (2, 5, 7)  # sorted by problem_index, lines were written reversed
    assert run.accuracy == (1.0, 0.0, 3 / 8) and run.samples_per_problem == 8
    assert run.source == str(tmp_path / "e")


def test_per_problem_accuracy_rejects_ragged_problems():
    records = [{"problem_index": 0, "sample_index": 0, "correct": True}] + [
        {"problem_index": 1, "sample_index": s, "correct": False} for s in range(2)
    ]
    with pytest.raises(ValueError, match="different numbers of samples"):
        compute_per_problem_accuracy(records, "dir_x")


def test_align_rejects_different_problem_sets(tmp_path):
    a = load_per_problem_accuracy(write_eval_dir(tmp_path / "eval_a", "a", [1, 2, 3]))
    b = load_per_problem_accuracy(write_eval_dir(tmp_path / "eval_b", "b", [1, 2, 3], problems=[0, 1, 4]))
    with pytest.raises(ValueError, match="different problem sets") as err:
        align_per_problem({"a": a, "b": b})
    assert "eval_a" in str(err.value) and "eval_b" in str(err.value)
    assert "[2]" in str(err.value) and "[4]" in str(err.value)  # the problems only one side has


def test_align_rejects_different_samples_per_problem(tmp_path):
    a = load_per_problem_accuracy(write_eval_dir(tmp_path / "eval_a", "a", [1, 2], k=8))
    b = load_per_problem_accuracy(write_eval_dir(tmp_path / "eval_b", "b", [1, 2], k=4))
    with pytest.raises(ValueError, match="different samples per problem") as err:
        align_per_problem({"a": a, "b": b})
    assert "eval_a" in str(err.value) and "eval_b" in str(err.value)


def test_build_comparison_refuses_misaligned_methods(tmp_path):
    runs = [
        load_method_run("base", write_eval_dir(tmp_path / "eval_base", "base", [1, 2, 3])),
        load_method_run("rft", write_eval_dir(tmp_path / "eval_rft", "rft", [1, 2])),
    ]
    with pytest.raises(ValueError, match="eval_rft"):
        build_comparison(runs, base_label="base")


# ---------------------------------------------------------------- paired statistics


def test_unpaired_interval_hand_computed():
    # A in eighths: sum 40, sum of squares 196 -> SS = 196 - 40^2/12 = 62.667, var 5.69697, sd 2.386832/8
    # = 0.298354; stderr 0.298354/sqrt(12) = 0.0861273; half-width 1.959964 * 0.0861273 = 0.168807
    result = compute_unpaired_interval(np.array(A_EIGHTHS) / 8)
    assert result.mean == pytest.approx(5 / 12)
    half = Z_95 * math.sqrt((196 - 40**2 / 12) / 11) / 8 / math.sqrt(12)
    assert half == pytest.approx(0.168807, abs=1e-6)
    assert (result.ci_low, result.ci_high) == pytest.approx((5 / 12 - half, 5 / 12 + half))
    assert compute_unpaired_interval([0.5]).ci_low is None


def test_case_a_paired_significant_although_unpaired_intervals_overlap():
    a, b = np.array(A_EIGHTHS) / 8, np.array(B_EIGHTHS) / 8
    diff = compute_paired_difference(a, b, "a", "b")
    assert diff.mean_delta == pytest.approx(8 / 8 / 12)  # (9 - 1) eighths over 12 problems
    # unpaired: B in eighths has sum 48, sum of squares 258 -> SS 66, var 6; half-width 1.96 * sqrt(6)/8/sqrt(12)
    half_b = Z_95 * math.sqrt(6) / 8 / math.sqrt(12)
    assert (diff.unpaired_b.ci_low, diff.unpaired_b.ci_high) == pytest.approx((0.5 - half_b, 0.5 + half_b))
    assert diff.unpaired_a.ci_high > diff.unpaired_b.ci_low  # 0.585 > 0.327: the unpaired intervals overlap
    assert diff.unpaired_overlap
    # paired sign-flip, exact: the m = 10 non-zero deltas all have magnitude 1/8, observed sum 8/8. Flipping
    # j of them gives |10 - 2j| / 8, >= 8/8 iff j <= 1 or j >= 9: (C(10,0) + C(10,1) + C(10,9) + C(10,10)) / 2^10
    by_hand = (1 + 10 + 10 + 1) / 1024
    hand_enumerated = sum(
        abs(sum(s * d for s, d in zip(signs, [1] * 9 + [-1], strict=True))) >= 8
        for signs in itertools.product([1, -1], repeat=10)
    )
    assert hand_enumerated == 22
    assert diff.p_value == pytest.approx(by_hand) and diff.p_value < 0.05
    assert diff.permutation == "exact" and diff.num_nonzero == 10 and diff.num_sign_vectors == 1024
    # paired bootstrap: a resample's mean delta is <= 0 iff it draws no more +1 than -1 problems; the exact
    # probability of that (multinomial 9/12, 1/12, 2/12) is 0.00145 < 0.025, so the 2.5% point is > 0
    prob_nonpositive = sum(
        Fraction(math.factorial(12), math.factorial(p) * math.factorial(n) * math.factorial(12 - p - n))
        * Fraction(9, 12) ** p * Fraction(1, 12) ** n * Fraction(2, 12) ** (12 - p - n)
        for p in range(13) for n in range(13 - p) if p <= n
    )  # fmt: skip
    assert float(prob_nonpositive) == pytest.approx(0.0014469, abs=1e-6)
    assert 0 < diff.ci_low < diff.mean_delta < diff.ci_high
    assert diff.paired_excludes_zero
    assert format_delta(json.loads(json.dumps(asdict(diff)))).endswith("p=0.021 !")


def test_identical_methods_give_zero_delta_and_p_one():
    acc = np.array(A_EIGHTHS) / 8
    diff = compute_paired_difference(acc, acc.copy())
    assert diff.mean_delta == 0 and (diff.ci_low, diff.ci_high) == (0.0, 0.0)
    assert diff.p_value == 1.0 and diff.num_nonzero == 0
    assert not diff.paired_excludes_zero and diff.unpaired_overlap


@pytest.mark.parametrize(
    "deltas, expected",
    [
        # sign vectors of (0.5, 0.25, -0.25): sums +-1.0, +-0.5 (4 vectors), +-0 -> |sum| >= 0.5 for 6 of 8
        ([0.5, 0.25, -0.25], 6 / 8),
        ([1.0, 1.0], 2 / 4),  # only (+,+) and (-,-) reach |sum| = 2
        ([0.5, 0.0, 0.5, 0.5], 2 / 8),  # the zero is dropped: m = 3, only all-equal signs reach 1.5
        ([0.25], 1.0),  # one delta: both signs give |sum| = 0.25
        ([0.75, -0.25, -0.25, -0.25], 1.0),  # observed sum 0: all 16 sign vectors are as extreme
    ],
)
def test_exact_sign_flip_p_values_hand_computed(deltas, expected):
    p, method, vectors = compute_sign_flip_p_value(deltas)
    assert method == "exact" and vectors == 2 ** sum(d != 0 for d in deltas)
    assert p == pytest.approx(expected)


def test_monte_carlo_sign_flip_uses_plus_one_correction_and_matches_exact():
    # 20 equal deltas: only 2 of 2^20 sign vectors are as extreme, so 999 random ones (almost surely) hit
    # none and p = (1 + 0) / (1 + 999); never 0
    p, method, vectors = compute_sign_flip_p_value(np.ones(20), num_permutations=999, seed=0)
    assert method == "monte_carlo" and vectors == 999 and p == pytest.approx(1 / 1000)
    # forced Monte Carlo on case (a) estimates the exact 22/1024 (binomial s.e. 0.001 at R = 20000)
    deltas = np.array(DELTA_EIGHTHS) / 8
    p_mc, method, _ = compute_sign_flip_p_value(deltas, exact_max_nonzero=0, num_permutations=20_000)
    assert method == "monte_carlo" and abs(p_mc - 22 / 1024) < 0.005
    assert compute_sign_flip_p_value(deltas, exact_max_nonzero=0, num_permutations=20_000) == (
        p_mc,
        method,
        20_000,
    )


def test_bootstrap_interval_matches_full_resampling_distribution():
    # n = 4 deltas: enumerate all 4^4 = 256 equally likely resamples. In quarters the values are {0,1,2,4};
    # by hand, sums <= 1 take 1 + 4 = 5 resamples (CDF 5/256 = 0.0195 < 0.025) and sum 2 takes 4 + 6 = 10
    # more (CDF 15/256 = 0.0586), so the exact 2.5% point is sum 2 -> mean 2/4/4 = 0.125
    deltas = [0.0, 0.25, 0.5, 1.0]
    means = sorted(sum(r) / 4 for r in itertools.product(deltas, repeat=4))
    exact_low, exact_high = means[math.ceil(0.025 * 256) - 1], means[math.ceil(0.975 * 256) - 1]
    assert exact_low == 0.125 and exact_high == 0.8125
    # both points sit >= 0.005 (5 binomial s.e. at 20000 draws) inside their atoms, so the seeded bootstrap
    # lands on them
    for seed in (0, 1, 2):
        low, high = compute_paired_bootstrap_interval(deltas, num_bootstrap=20_000, seed=seed)
        assert (low, high) == pytest.approx((exact_low, exact_high))


def test_bootstrap_is_seeded_and_sized_by_num_bootstrap():
    deltas = np.array(DELTA_EIGHTHS) / 8
    assert compute_paired_bootstrap_interval(deltas, 500, seed=3) == compute_paired_bootstrap_interval(
        deltas, 500, seed=3
    )
    # with one resample both bounds are that resample's mean
    low, high = compute_paired_bootstrap_interval(deltas, num_bootstrap=1)
    assert low == high
    with pytest.raises(ValueError):
        compute_paired_bootstrap_interval([], 10)


def test_paired_difference_rejects_unequal_vectors():
    with pytest.raises(ValueError, match="equal-length"):
        compute_paired_difference([0.5, 1.0], [0.5])


# ---------------------------------------------------------------- the comparison table


def make_runs(tmp_path):
    return [
        load_method_run("base", write_eval_dir(tmp_path / "eval_base", "base", A_EIGHTHS)),
        load_method_run(
            "sd-zero",
            write_eval_dir(tmp_path / "eval_sdzero", "sd-zero", B_EIGHTHS),
            {"samples_generated": 12288, "tokens_generated": 3_500_000, "wall_seconds": 5400.0},
        ),
        load_method_run(
            "rft", write_eval_dir(tmp_path / "eval_rft", "rft", A_EIGHTHS), {"samples_generated": 800}
        ),
        failed_method_run("grpo", "CUDA OOM at step 12"),
        load_method_run("ssd", tmp_path / "eval_ssd_missing"),
    ]


def test_comparison_dict_holds_paired_deltas_and_skips_self(tmp_path):
    comparison = build_comparison(make_runs(tmp_path), base_label="base", num_bootstrap=2000)
    assert json.loads(json.dumps(comparison)) == comparison  # JSON-serialisable as is
    assert comparison["num_problems"] == 12 and comparison["samples_per_problem"] == 8
    assert comparison["reference"] == "sd-zero"
    rows = {m["label"]: m for m in comparison["methods"]}
    assert [m["label"] for m in comparison["methods"]] == ["base", "sd-zero", "rft", "grpo", "ssd"]
    assert rows["base"]["vs_base"] is None and rows["sd-zero"]["vs_reference"] is None  # no self-comparison
    assert rows["sd-zero"]["vs_base"]["p_value"] == pytest.approx(22 / 1024)
    assert rows["rft"]["vs_reference"]["mean_delta"] == pytest.approx(-1 / 12)  # rft = base, minus sd-zero
    assert rows["rft"]["vs_base"]["p_value"] == 1.0
    assert rows["grpo"]["status"] == "failed" and rows["grpo"]["vs_base"] is None
    assert rows["ssd"]["status"] == "failed" and "no summary.json or samples.jsonl" in rows["ssd"]["reason"]
    assert rows["sd-zero"]["samples_generated"] == 12288 and rows["base"]["wall_seconds"] is None


def test_text_and_markdown_tables_show_every_row_and_the_tests(tmp_path):
    comparison = build_comparison(make_runs(tmp_path), base_label="base", num_bootstrap=2000)
    text = format_comparison_text(comparison)
    lines = text.splitlines()
    header = lines[0]
    for column in ("avg@8 (95% CI)", "pass@1", "pass@8", "maj@8", "len", "trunc", "samples", "tokens", "wall",
                   "delta vs base", "delta vs sd-zero"):  # fmt: skip
        assert column in header
    sdzero = next(line for line in lines if line.startswith("sd-zero"))
    assert "50.0 [32.7, 67.3]" in sdzero  # unpaired interval, see the case (a) test
    assert "+8.3 [" in sdzero and "p=0.021 !" in sdzero  # vs base: paired significant, unpaired overlap
    assert "12.29k" in sdzero and "3.50M" in sdzero and "90.0m" in sdzero
    rft = next(line for line in lines if line.startswith("rft"))
    assert "+0.0 [+0.0, +0.0] p=1.000" in rft and "-8.3 [" in rft
    assert "800" in rft and rft.count(" - ") >= 2  # tokens and wall missing from its budget
    grpo = next(line for line in lines if line.startswith("grpo"))
    assert "failed" in grpo and grpo.endswith("CUDA OOM at step 12")
    assert any(line.startswith("ssd") and "failed" in line for line in lines)
    avg_end = header.index("avg@8 (95% CI)") + len("avg@8 (95% CI)")  # right-aligned numeric columns
    assert sdzero.index("50.0 [32.7, 67.3]") + len("50.0 [32.7, 67.3]") == avg_end
    assert lines[1].startswith("-------  ------  ") and set(lines[1]) == {"-", " "}
    assert "sign-flip" in text and "permutation" in text and "bootstrap" in text and "2000" in text
    assert "12 problems x 8 samples" in text

    markdown = format_comparison_markdown(comparison)
    md_lines = markdown.splitlines()
    assert md_lines[0].startswith("| method | status | avg@8 (95% CI) |")
    assert md_lines[1].startswith("| --- | --- | ---: |")
    assert sum(line.startswith("| ") for line in md_lines) == 2 + 5  # header, alignment, five methods
    assert any(line.startswith("| grpo | failed |") and "CUDA OOM at step 12 |" in line for line in md_lines)
    assert "sign-flip permutation" in markdown


def test_reference_column_is_dropped_when_the_reference_is_absent(tmp_path):
    runs = make_runs(tmp_path)
    comparison = build_comparison([runs[0], runs[2]], base_label="base", num_bootstrap=100)
    assert comparison["reference"] is None
    assert "delta vs sd-zero" not in format_comparison_text(comparison)
    with pytest.raises(ValueError, match="base method"):
        build_comparison([runs[2]], base_label="base")


# ---------------------------------------------------------------- sample-efficiency curves


def test_extract_curve_points_from_metrics_jsonl(tmp_path):
    rows = [
        {"step": 0, "val/accuracy": 0.25},  # before training: no budget yet -> 0 samples
        {"step": 1, "train/loss": 1.0, "budget/samples_generated": 64, "budget/wall_seconds": 10.0},
        {"step": 2, "val/accuracy": 0.5, "budget/samples_generated": 128, "budget/wall_seconds": 20.0},
        {"step": 3, "val/accuracy": float("nan"), "budget/samples_generated": 192},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    points = extract_curve_points(path, extra=[(256, 0.75)])
    assert points == [CurvePoint(0.0, 0.25, 0.0), CurvePoint(128.0, 0.5, 20.0), CurvePoint(256, 0.75, None)]
    path.write_text(json.dumps({"step": 4, "val/accuracy": 0.5}) + "\n")
    with pytest.raises(ValueError, match="step 4"):
        extract_curve_points(path)


def test_plot_writes_png_with_one_line_per_method(tmp_path):
    curves = {
        "sd-zero": [CurvePoint(0, 0.25, 0.0), CurvePoint(128, 0.5, 3600.0), CurvePoint(64, 0.4, 1800.0)],
        "grpo": [(0, 0.25), (128, 0.3)],
        "rft": [(512, 0.45)],  # a single final evaluation
    }
    png = tmp_path / "plots" / "samples.png"
    fig = plot_sample_efficiency(curves, png)
    assert png.is_file() and png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["sd-zero", "grpo", "rft"]
    assert list(lines[0].get_xdata()) == [0, 64, 128]  # sorted by samples
    assert list(lines[0].get_ydata()) == pytest.approx([25.0, 40.0, 50.0])  # percent
    assert ax.get_xlabel() == "samples generated" and ax.get_ylabel() == "accuracy (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sd-zero", "grpo", "rft"]

    wall = plot_sample_efficiency(curves, tmp_path / "wall.png", x="wall_seconds")
    (ax,) = wall.axes
    assert [line.get_label() for line in ax.get_lines()] == ["sd-zero"]  # the others have no wall time
    assert list(ax.get_lines()[0].get_xdata()) == [0.0, 0.5, 1.0] and "hours" in ax.get_xlabel()


def test_comparison_imports_without_matplotlib_or_heavy_deps():
    probe = (
        "import sys; import self_distillation.comparison; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch', 'vllm', 'ray')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
