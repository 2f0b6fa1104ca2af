"""UNDO's pure parts (self_revision_training.undo_data): the shipped templates, one-pass placeholder filling
(LaTeX braces survive), error selection, the verified filter, R_k carried forward, the stopping rule."""

from __future__ import annotations

import hashlib

import pytest

from self_revision_training import undo_tutor as u
from self_revision_training.shared.config import ConfigError, PromptConfig, load_config
from self_revision_training.shared.prompts import build_revision_prompt
from self_revision_training.undo_data import UndoDataConfig


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_the_shipped_templates_are_the_reimplementations_text():
    """Hashes of MT121201/undo-iterative-distill:src/prompt/teacher_prompt.py @00414b6 as rendered (its
    TEACHER_PROMPT_ITER1.format(...) with placeholders for values; build_teacher_prompt_iter0's messages)."""
    names = {f: "{" + f + "}" for f in u.FIELDS if f != "validation_examples"}
    tutor = u.fill_fields(u.UNDO_TUTOR_TEMPLATE, validation_examples="", **names)
    assert sha(tutor) == "f76938b4c8dfc9928f5c9a66756f6e8b76c9719dcfadd5a474a5a4e24f44891f"
    assert (
        sha(u.UNDO_ITERATION0_SYSTEM_PROMPT)
        == "c587e2efb9a4f1500d9b2dbdbecaa8d0910eeeacee5ca687b34189889e27ad9c"
    )
    assert (
        sha(u.UNDO_ITERATION0_TEMPLATE) == "5f55eb5a18edce5ded21cee5344297e7e02db4a673efef71c2365848e9600b6d"
    )
    assert "must end inside \\boxed{}." in u.UNDO_TUTOR_TEMPLATE


STUDENT = u.StudentAnswer(
    response="We get $\\frac{1}{2}$; the {score} is \\boxed{\\tfrac{1}{2}}.", correct=False, score=0.0
)
PREVIOUS = {
    "rationale": "Since $\\{x\\} = x - \\lfloor x \\rfloor$, we get \\boxed{\\frac{1}{2}}.",
    "iteration": 1,
}
ERRORS = [
    {"question": "Find $\\sqrt{4}$.", "student_answer": "It is \\boxed{3}.", "score": 0.0},
    {"question": "What is $2^{10}$?", "student_answer": "\\boxed{1000}", "score": 0.25},
]
GOLDEN = """You are an AI tutor tasked with improving a student's understanding of mathematical
problem-solving. You will be given a question, previous teacher answers, a student's answer,
and a score. Your job is to analyze these inputs and create a new answer that will help
the student learn better.

Here are some examples of the task:
### question:
Let $x = \\frac{3}{2}$. Find $\\{x\\}$.

### ITERATION 1 teacher answer:
Since $\\{x\\} = x - \\lfloor x \\rfloor$, we get \\boxed{\\frac{1}{2}}.

### student answer:
We get $\\frac{1}{2}$; the {score} is \\boxed{\\tfrac{1}{2}}.

### score:
0

------------similar such examples from the validation set------------

### question:
Find $\\sqrt{4}$.

### student answer:
It is \\boxed{3}.

### score:
0

### question:
What is $2^{10}$?

### student answer:
\\boxed{1000}

### score:
0.25

First, carefully analyze the student's answer. Compare it to the teacher's past answers
and identify any mistakes or areas where the student's reasoning could be improved.
Then regenerate a new improved rationale.

Your new answer should:
1. Use clear, step-by-step reasoning
2. Explain any concepts the student may have misunderstood
3. Provide additional context or examples if necessary
4. Use the same calculation format as the teacher's answer (LaTeX if present).
5. All final answers must end inside \\boxed{}.

Write your new answer using the format:

### new_answer
[Step-by-step reasoning with calculations]

Final Answer: [Correct boxed answer]
"""


def test_the_tutor_prompt_holds_answer_score_rationale_and_errors_byte_for_byte():
    examples = u.build_validation_examples(ERRORS, u.UNDO_VALIDATION_EXAMPLE_TEMPLATE)
    text = u.build_tutor_text(
        "undo", "Let $x = \\frac{3}{2}$. Find $\\{x\\}$.", STUDENT, PREVIOUS, examples, "(none)"
    )
    assert text == GOLDEN  # the student's literal "{score}" is not substituted a second time


def test_no_previous_rationale_and_no_errors_give_the_verbatim_layout():
    text = u.build_tutor_text("undo", "Q", STUDENT, None, "", "(none)")
    assert "### ITERATION 0 teacher answer:\n(none)\n\n" in text
    assert "validation set------------\n\nFirst, carefully" in text


def test_fill_fields_is_one_pass_and_names_missing_values():
    assert u.fill_fields("{question} {x} {score}", question="{score}", score="1") == "{score} {x} 1"
    with pytest.raises(ValueError, match=r"\{score\}"):
        u.fill_fields("{question} {score}", question="q")


def test_teacher_request_layouts(tiny_tokenizer):
    cfg = PromptConfig()
    settings = u.TeacherPromptSettings(template=u.SELF_REVISION)
    request, name = u.build_teacher_request(
        tiny_tokenizer, "What is 1 + 1?", STUDENT, None, "", settings, cfg
    )
    expected = build_revision_prompt(tiny_tokenizer, "What is 1 + 1?", STUDENT.response, False, cfg)
    assert (
        name == "self_revision" and request == expected
    )  # SD-Zero's layout with P_0 (the student was wrong)
    assert cfg.incorrect_phrase in request.text
    first = u.TeacherPromptSettings(template="undo", first_template="undo_iteration0")
    request, name = u.build_teacher_request(tiny_tokenizer, "What is 1 + 1?", STUDENT, None, "", first, cfg)
    assert name == "undo_iteration0" and request.text.startswith("<|im_start|>system\nYou are a meticulous")
    assert (
        "Problem:\nWhat is 1 + 1?\n\nFollow the rules" in request.text
        and STUDENT.response not in request.text
    )
    request, name = u.build_teacher_request(tiny_tokenizer, "Q?", STUDENT, PREVIOUS, "", first, cfg)
    assert name == "undo" and tiny_tokenizer.decode(request.ids) == request.text


def test_a_literal_template_needs_a_question_and_unknown_names_are_refused():
    assert u.TeacherPromptSettings(template="Solve: {question}").template == "Solve: {question}"
    with pytest.raises(ValueError, match="question"):
        u.TeacherPromptSettings(template="undoo")
    with pytest.raises(ConfigError, match="student_samples"):
        load_config(UndoDataConfig, None, ["model.path=m", "dataset.path=d", "output_dir=o"])
    cfg = load_config(UndoDataConfig, None, ["model.path=m", "dataset.path=d", "output_dir=o",
                                                "teacher_prompt.template=undo_iteration0"])  # fmt: skip
    assert (
        cfg.sampling.temperature == 0.0 and cfg.sampling.max_tokens == 512
    )  # the re-implementation's teacher


def sample(i: int, k: int, correct: bool, response: str = "r") -> dict:
    return {"problem_index": i, "sample_index": k, "correct": correct, "response": f"{response}{i}.{k}"}


def test_select_errors_threshold_cap_seed_and_the_first_wrong_sample():
    records = [sample(i, k, (i + k) % 3 == 0) for i in range(10) for k in range(2)]
    problems = {i: f"problem {i}" for i in range(10)}
    accuracy = {i: sum((i + k) % 3 == 0 for k in range(2)) / 2 for i in range(10)}
    errors = u.select_errors(records, problems, 0.0, 100, seed=0)
    assert [e["problem_index"] for e in errors] == [i for i in range(10) if accuracy[i] == 0]
    half = u.select_errors(records, problems, 0.5, 100, seed=0)
    assert [e["problem_index"] for e in half] == list(range(10))  # every problem has accuracy <= 0.5 here
    first_wrong = {e["problem_index"]: e["student_answer"] for e in half}
    assert first_wrong[0] == "r0.1" and first_wrong[1] == "r1.0"  # sample 0 of problem 0 was right
    capped = u.select_errors(records, problems, 0.5, 3, seed=1)
    assert len(capped) == 3 and capped == u.select_errors(records, problems, 0.5, 3, seed=1)
    assert capped != u.select_errors(records, problems, 0.5, 3, seed=2)
    assert u.select_errors(records, problems, 0.5, 0, seed=0) == []
    with pytest.raises(ValueError, match="problem 1, which"):
        u.select_errors(records, {0: "p"}, 0.5, 10, seed=0)


def test_student_answers_show_the_first_sample_and_the_accuracy():
    answers = u.load_student_answers([sample(0, 1, True), sample(0, 0, False), sample(1, 0, True)])
    assert answers[0] == u.StudentAnswer("r0.0", False, 0.5) and answers[1].score == 1.0
    assert u.format_score(0.5) == "0.50" and u.format_score(1.0) == "1" and u.format_score(0) == "0"


def rationale(i: int, **fields) -> dict:
    base = {"original_index": i, "finish_reason": "stop", "completion": "x", "skip": None, "correct": True}
    return {**base, "reason": "correct", **fields}


def test_only_verified_finished_rationales_are_kept_and_drops_are_counted_by_reason():
    records = [
        rationale(0),
        rationale(1, correct=False, reason="wrong"),
        rationale(2, finish_reason="length"),  # correct but cut: no end of turn
        rationale(3, completion="  "),
        rationale(4, skip="vote_tie"),
        rationale(5, correct=False, reason="no_answer"),
        rationale(6),
    ]
    kept, report = u.select_verified(records)
    assert [r["original_index"] for r in kept] == [0, 6]
    assert report == {
        "input": 7,
        "kept": 2,
        "dropped": {"truncated": 1, "empty": 1, "no_reward": 1, "wrong": 2},
        "wrong_reasons": {"wrong": 1, "no_answer": 1},
    }


def test_extract_rationale_cuts_the_answer_heading():
    text = "Analysis.\n### new_answer\nStep 1.\nFinal Answer: \\boxed{2}\n"
    assert u.extract_rationale(text, True) == "Step 1.\nFinal Answer: \\boxed{2}"
    assert u.extract_rationale(text, False) == text and u.extract_rationale("plain", True) == "plain"


def test_r_k_carries_the_latest_verified_rationale_per_problem():
    previous = {0: {"original_index": 0, "rationale": "old0", "iteration": 1},
                2: {"original_index": 2, "rationale": "old2", "iteration": 1}}  # fmt: skip
    merged = u.merge_rationales(previous, [{"original_index": 2, "completion": "new2"},
                                           {"original_index": 5, "completion": "new5"}], 2)  # fmt: skip
    assert [(r["original_index"], r["rationale"], r["iteration"]) for r in merged] == [
        (0, "old0", 1), (2, "new2", 2), (5, "new5", 2)
    ]  # fmt: skip


def test_the_stopping_rule_and_the_best_iteration():
    history = {1: 0.50, 2: 0.55, 3: 0.57, 4: 0.56}
    assert u.compute_best_iteration(history) == 3
    assert [u.check_stop({k: history[k] for k in range(1, n + 1)}, 1, 0.0, 5) for n in range(1, 5)] == [
        None, None, None, "patience"
    ]  # fmt: skip
    assert u.check_stop(history, 2, 0.0, 5) is None  # one more try with patience 2
    assert u.check_stop(history, 2, 0.0, 4) == "max_iterations"
    assert u.compute_best_iteration({1: 0.5, 2: 0.5}) == 1  # a tie is no improvement
    assert u.compute_best_iteration({1: 0.50, 2: 0.505}, min_delta=0.01) == 1
    assert u.check_stop({}, 1, 0.0, 5) is None
