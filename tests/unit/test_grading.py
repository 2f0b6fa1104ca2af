"""Math verifier: extraction, a table of equivalent/wrong forms, deadlines, batch and thread use."""

from __future__ import annotations

import threading
import time

import pytest

from self_revision_training.shared.answers import (
    extract_answer,
    extract_boxed,
    extract_last_number,
    normalize_ground_truth,
)
from self_revision_training.shared.config import GradingConfig
from self_revision_training.shared.rewards.math_verify import (
    MathGrader,
    grade_math,
    grade_math_detailed,
    verify_in_worker,
)

B = "\\boxed"

# (response, ground truth, expected correct)
GRADE_TABLE = [
    # fractions
    (rf"So {B}{{\frac{{1}}{{2}}}}.", "0.5", True),
    (rf"{B}{{\dfrac{{3}}{{4}}}}", "3/4", True),
    (rf"{B}{{\tfrac12}}", r"\frac{1}{2}", True),
    (rf"{B}{{6/8}}", r"\frac{3}{4}", True),
    (rf"{B}{{-\frac{{2}}{{3}}}}", "-2/3", True),
    (rf"{B}{{\frac{{2}}{{3}}}}", "-2/3", False),
    # decimals
    (rf"{B}{{0.5}}", r"\frac{1}{2}", True),
    (rf"{B}{{12.0}}", "12", True),
    (rf"{B}{{3.14}}", "3.14", True),
    (rf"{B}{{3.15}}", "3.14", False),
    (rf"{B}{{0.25}}", "1/4", True),
    # percentages
    (rf"{B}{{50\%}}", "50", True),
    (rf"{B}{{25\%}}", "0.25", True),
    (rf"{B}{{40\%}}", "50", False),
    # integers, signs, thousands
    (rf"{B}{{42}}", "42", True),
    (rf"{B}{{-7}}", "-7", True),
    (rf"{B}{{7}}", "-7", False),
    (rf"{B}{{1,000}}", "1000", True),
    (rf"{B}{{1234}}", "1,234", True),
    (rf"{B}{{18}}", "Natalia sold 48/2 = 24 clips.\n#### 18", True),
    (rf"{B}{{19}}", "#### 18", False),
    (rf"{B}{{72}}", "... she sold 72 clips altogether.\n#### 72", True),
    # LaTeX vs plain
    (rf"{B}{{3\sqrt{{13}}}}", r"\sqrt{117}", True),
    (rf"{B}{{\sqrt{{2}}/2}}", r"\frac{\sqrt{2}}{2}", True),
    (rf"{B}{{\pi/2}}", r"\frac{\pi}{2}", True),
    (rf"{B}{{2\pi}}", r"\pi", False),
    (rf"{B}{{2x+1}}", "1+2x", True),
    (rf"{B}{{x^2-1}}", "(x-1)(x+1)", True),
    (rf"{B}{{x^2+1}}", "(x-1)(x+1)", False),
    (rf"{B}{{x=2}}", "2", True),
    (rf"{B}{{\infty}}", r"\infty", True),
    (rf"{B}{{2^{{10}}}}", "1024", True),
    # intervals
    (rf"{B}{{[1, 3)}}", "[1,3)", True),
    (rf"{B}{{(1, 3]}}", "[1,3)", False),
    (rf"{B}{{(-\infty, 2)}}", r"(-\infty,2)", True),
    (rf"{B}{{(-\infty, 2]}}", r"(-\infty,2)", False),
    # sets and tuples
    (rf"{B}{{\{{1,2,3\}}}}", r"\{3,2,1\}", True),
    (rf"{B}{{2, 3}}", r"\{3,2\}", True),
    (rf"{B}{{\{{1,2\}}}}", r"\{1,2,3\}", False),
    (rf"{B}{{(3, \frac{{\pi}}{{2}})}}", r"\left( 3, \frac{\pi}{2} \right)", True),
    # units and decorations
    (rf"{B}{{90^\circ}}", "90", True),
    (rf"{B}{{5 \text{{ dollars}}}}", "5", True),
    (rf"{B}{{\$5}}", "5", True),
    (rf"{B}{{5\text{{ cm}}^2}}", "5", True),
    (rf"{B}{{6 \text{{ cm}}}}", "5", False),
    (rf"{B}{{\text{{(B)}}}}", "B", True),
    (rf"{B}{{B}}", "B", True),
    (rf"{B}{{C}}", "B", False),
    # no boxed answer (strict extraction)
    ("The answer is 42.", "42", False),
    ("", "42", False),
    (rf"{B}{{}}", "42", False),
    (rf"{B}{{42", "42", False),
    # nested braces
    (rf"{B}{{\frac{{\sqrt{{3}}}}{{2}}}}", r"\frac{\sqrt{3}}{2}", True),
    (rf"{B}{{{{5}}}}", "5", True),
    (rf"the answer is {B}{{{B}{{4}}}}", "4", True),
    # several boxed answers: the last one counts
    (rf"First {B}{{3}}, no wait, {B}{{4}}", "4", True),
    (rf"First {B}{{4}}, no wait, {B}{{3}}", "4", False),
    # other spellings of boxed
    (rf"{B} 5", "5", True),
    (r"$\fbox{12}$", "12", True),
    (rf"{B}5.", "5", True),
    # wrong answers with near misses
    (rf"{B}{{0.3333}}", r"\frac{1}{3}", False),
    (rf"{B}{{1e3}}", "1000", False),
]


@pytest.fixture(scope="module")
def grader():
    with MathGrader(GradingConfig(num_workers=2, timeout_s=5.0)) as g:
        yield g


def test_table_has_at_least_60_cases():
    assert len(GRADE_TABLE) >= 60


def test_grade_table(grader):
    results = grader.grade_batch([r for r, _, _ in GRADE_TABLE], [g for _, g, _ in GRADE_TABLE])
    wrong = [
        (resp, gt, want, res)
        for (resp, gt, want), res in zip(GRADE_TABLE, results, strict=True)
        if res.correct != want
    ]
    assert not wrong, "\n".join(f"{r!r} vs {g!r}: want {w}, got {res}" for r, g, w, res in wrong)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the group
        (r"\boxed{a} then \boxed{b}", "b"),
        (r"\boxed {7}", "7"),
        (r"\boxed 5$", "5"),
        (r"\boxed5", "5"),
        (r"\fbox{x+1}", "x+1"),
        (r"\boxed{a} then \boxed{", "a"),  # an unclosed last box falls back to the previous one
        (r"\boxed{}", None),
        ("no box", None),
        (r"\boxedfoo{3}", None),  # a different command
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_last_number_fallback_is_opt_in():
    text = "We add them and get 1,234 apples."
    assert extract_answer(text, "boxed") is None
    assert extract_answer(text, "boxed_or_last_number") == "1234"
    assert extract_last_number("x = -3.5 and y = 2/3") == "2/3"
    assert extract_answer(r"\boxed{7} and 9", "boxed_or_last_number") == "7"  # boxed wins


def test_last_number_mode_grades(tmp_path):
    with MathGrader(GradingConfig(extraction="boxed_or_last_number", num_workers=1)) as g:
        assert g.grade("so the total is 42 apples", "42").correct
        assert not g.grade("so the total is 41 apples", "42").correct


def test_normalize_ground_truth():
    assert normalize_ground_truth("She has 3 + 4 = 7\n#### 1,000") == "1000"
    assert normalize_ground_truth(r" \frac{1}{2} ") == r"\frac{1}{2}"
    assert normalize_ground_truth("(1,2)") == "(1,2)"


def test_reasons(grader):
    assert grader.grade("no answer here", "3").reason == "no_answer"
    assert grader.grade(r"\boxed{3}", "3").reason == "correct"
    assert grader.grade(r"\boxed{4}", "3").reason == "wrong"
    assert grader.grade(r"\boxed{4}", r"\frac{").reason in ("unparsable_ground_truth", "wrong")


ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9^{9^{9}}}}}}",
    r"\boxed{10^{10^{10^{10^{10}}}} - 10^{10^{10^{10^{10}}}} + 1}",
    r"\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    r"\boxed{" + "+".join(f"x^{{{i}}}" for i in range(300)) + "}",
    r"\boxed{\frac{" + "1" * 5000 + "}{" + "7" * 5000 + "}}",
    "\\boxed{" * 2000 + "1" + "}" * 2000,
    "x " * 200_000 + r"\boxed{2}",
]


def test_adversarial_inputs_return_within_deadline():
    timeout = 3.0
    with MathGrader(GradingConfig(num_workers=2, timeout_s=timeout)) as g:
        g.grade(r"\boxed{1}", "1")  # start the workers outside the timed region
        for text in ADVERSARIAL:
            start = time.monotonic()
            result = g.grade(text, "1")
            elapsed = time.monotonic() - start
            assert elapsed < timeout + 2.0, f"{text[:60]!r} took {elapsed:.1f} s"
            assert result.reason in ("wrong", "timeout", "unparsable_answer", "no_answer", "error", "correct")
        start = time.monotonic()
        results = g.grade_batch(ADVERSARIAL, ["1"] * len(ADVERSARIAL))
        assert time.monotonic() - start < len(ADVERSARIAL) * (timeout + 2.0) / 2 + 2
        assert not results[0].correct


def test_grade_math_from_a_thread():
    """math-verify's own timeout uses signal.alarm (main thread only); ours must work anywhere."""
    out = {}

    def run():
        out["ok"] = grade_math(r"so \boxed{\frac{1}{2}}", "0.5")
        out["detail"] = grade_math_detailed(r"\boxed{3}", "4")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert out["ok"] is True
    assert out["detail"].correct is False and out["detail"].reason == "wrong"


def test_batch_is_parallel_and_ordered(grader):
    responses = [rf"\boxed{{{i}}}" for i in range(40)]
    truths = [str(i if i % 3 else i + 1) for i in range(40)]
    results = grader.grade_batch(responses, truths)
    assert [r.correct for r in results] == [i % 3 != 0 for i in range(40)]


def test_bad_batch_input(grader):
    with pytest.raises(ValueError, match="2 responses but 1"):
        grader.grade_batch(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="item 0"):
        grader.grade_batch([None], ["1"])  # type: ignore[list-item]


# Shapes that exercise the grader workers' exact speed-ups: SLL parsing fails (`x^2`, `x_1`, `\pi^2`) or
# succeeds (sets, intervals, tuples, matrices, relations), lexing errors, syntax errors in both modes.
SPEEDUP_CASES = [
    (rf"{B}{{8726+93x^2}}", "92x^2+8726"),
    (rf"{B}{{92x^2+8726}}", "92x^2+8726"),
    (rf"{B}{{\pi^2}}", r"\pi^{2}"),
    (rf"{B}{{a_1+b_{{10}}}}", "a_1+b_{10}"),
    (rf"{B}{{x_1^2}}", "x_1^2"),
    (rf"{B}{{2^{{x^2}}}}", "2^{x^2}"),
    (rf"{B}{{[14, 5082)}}", "[14, 5082)"),
    (rf"{B}{{(14, 5082]}}", "[14, 5082)"),
    (rf"{B}{{\{{4, 5\}}}}", r"\{5, 4\}"),
    (rf"{B}{{(1, 2), (3, 4)}}", "(1,2),(3,4)"),
    (rf"{B}{{\begin{{pmatrix}} 1 & 2 \end{{pmatrix}}}}", r"\begin{pmatrix}1&2\end{pmatrix}"),
    (rf"{B}{{f(x) = x^2 + 1}}", "x^2+1"),
    (rf"{B}{{@#~}}", "3"),
    (rf"{B}{{x^}}", "3"),
    (rf"{B}{{\frac{{1}}{{}}}}", "1"),
    (rf"{B}{{\foo{{3}}}}", "3"),
    (rf"{B}{{3}}", "@#~"),
    (rf"{B}{{1,234,567}}", "1234567"),
    (rf"{B}{{0.1 + 0.2}}", "0.3"),
    (rf"{B}{{\sin^2 x + \cos^2 x}}", "1"),
    (rf"{B}{{\sqrt[3]{{27}}}}", "3"),
    (rf"{B}{{\log_2 8}}", "3"),
    (rf"{B}{{\binom{{5}}{{2}}}}", "10"),
    (rf"{B}{{5!}}", "120"),
    (rf"{B}{{|-3|}}", "3"),
    (rf"{B}{{\mathbb{{R}}}}", r"(-\infty,\infty)"),
    (rf"{B}{{\emptyset}}", r"\{\}"),
    (rf"{B}{{y = 2x + 3}}", "2x+3"),
    (rf"{B}{{x \in [0, 1]}}", "[0,1]"),
    (rf"{B}{{1 \le x < 2}}", "[1,2)"),
    (rf"{B}{{\frac{{1+\sqrt{{5}}}}{{2}}}}", r"\frac{1+\sqrt5}{2}"),
    (rf"{B}{{10^{{-3}}}}", "0.001"),
    (rf"{B}{{3 \times 10^5}}", "300000"),
    (rf"{B}{{x^2 - 5x + 6}}", "(x-2)(x-3)"),
    (rf"{B}{{\alpha^2+\beta_1}}", r"\beta_1+\alpha^2"),
    (rf"{B}{{\text{{yes}}}}", "Yes"),
]


def test_batches_equal_one_item_calls_and_plain_math_verify(grader):
    """Chunked dispatch and the workers' speed-ups change no grade: compare with one-item calls and with
    math-verify run unmodified in this process (which never installs the speed-ups)."""
    cases = [(r, g) for r, g, _ in GRADE_TABLE] + SPEEDUP_CASES
    responses, truths = [r for r, _ in cases], [g for _, g in cases]
    batched = grader.grade_batch(responses, truths)
    single = [grader.grade(r, g) for r, g in cases]
    plain = [verify_in_worker(r, g, "boxed", max(1, int(5.0 // 3))) for r, g in cases]
    assert batched == single
    mismatches = [(c, b, p) for c, b, p in zip(cases, batched, plain, strict=True) if b != p]
    assert not mismatches, mismatches
