"""UNDO's pure core (UNDO, arXiv 2504.02521; ../shared/reference/related_methods.md section 5): the tutor
prompt templates (config values; the shipped ones are module constants), one-pass placeholder filling,
error selection from an evaluation, the teacher request of one problem, the verified-rationale filter, the
R_k merge and the outer loop's stopping rule. `undo_data` runs the regeneration stage with them and
`self_distillation.undo` the loop.

Placeholders ({question} {iteration} {teacher_answer} {student_answer} {score} {validation_examples}) are
filled in one pass by name, never with str.format, so LaTeX braces and a student answer that happens to
contain "{score}" survive as written.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from self_revision_training.shared.config import (
    PromptConfig,
)
from self_revision_training.shared.prompts import (
    ChatTokenizer,
    PromptTokens,
    build_chat_prompt_text,
    build_revision_prompt,
    encode_text,
)

# ----------------------------------------------------------------------------------------------
# templates (config values; these are the shipped ones)

# MT121201/undo-iterative-distill:src/prompt/teacher_prompt.py @00414b6, TEACHER_PROMPT_ITER1 as rendered
# (its `\\boxed{{}}` is `\boxed{}`), verbatim except for {validation_examples} after the separator line: the
# examples the separator announces (the re-implementation never filled them; the paper's text is unknown).
UNDO_TUTOR_TEMPLATE = """You are an AI tutor tasked with improving a student's understanding of mathematical
problem-solving. You will be given a question, previous teacher answers, a student's answer,
and a score. Your job is to analyze these inputs and create a new answer that will help
the student learn better.

Here are some examples of the task:
### question:
{question}

### ITERATION {iteration} teacher answer:
{teacher_answer}

### student answer:
{student_answer}

### score:
{score}

------------similar such examples from the validation set------------
{validation_examples}
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
# One validation error, as the block after the separator shows it (question, student answer, score; the
# validation ground truth is not shown). Each is preceded by "\n", so no examples = the verbatim text.
UNDO_VALIDATION_EXAMPLE_TEMPLATE = (
    "### question:\n{question}\n\n### student answer:\n{student_answer}\n\n### score:\n{score}\n"
)
# The same file's build_teacher_prompt_iter0: system prompt and user turn, as rendered.
UNDO_ITERATION0_SYSTEM_PROMPT = """You are a meticulous math expert and proof assistant.
Write compact, equation-first solutions that look like the user's examples.

STRICT formatting (auto-evaluated):
1) Keep reasoning short:
   - Routine/algebra/arithmetic: ≤3 concise lines before the final line.
   - Piecewise/monotonicity/logic: ≤5 concise lines before the final line.
2) No restating the problem or listing givens.
3) Prefer symbol-heavy lines (equalities/implications). Combine trivial steps.
4) No \\boxed{...} until the very end.
5) End with EXACTLY ONE line with EXACTLY ONE boxed answer:
   Final Answer: $\\boxed{...}$
   - Multiple-choice: only the letter (A–E) inside the box.
   - Numeric/fraction: simplest exact form (e.g., \\tfrac{13}{6}, \\sqrt{2}, 7, 0.5).
   - Percentages: include % only if asked explicitly.
   - ± values: \\boxed{\\pm 3}.
   - Lists/sets/tuples: comma-separated, increasing order when applicable.
6) Balance braces in the final \\boxed{...}. Do not re-box or repeat anywhere else.

Concise style guide:
- Use one computation line for simple sums/products.
- Chain steps with =, ⇒, ⟹ when clear; avoid prose.
- For piecewise/monotone: state each condition in one line; intersect once.
- Choose the shortest correct method.

Mini examples (style + brevity):

Ex 1 (arithmetic seq):
(y+2)−(−\\tfrac13)=4y−(y+2) ⇒ y+\\tfrac73=3y−2 ⇒ \\tfrac{13}{3}=2y ⇒ y=\\tfrac{13}{6}
Final Answer: $\\boxed{\\tfrac{13}{6}}$

Ex 2 (percent share):
Area=12·500=6000; Land=5·6000=30000; Build=60000; Total=90000; Partner=90000−54000=36000 ⇒ 36000/90000=40\\%
Final Answer: $\\boxed{40\\%}$

Ex 3 (MC derivatives):
f'(x)=−\\cos x, f''(x)=\\sin x ⇒ matches choice B
Final Answer: $\\boxed{B}$

Ex 4 (cube edges):
Each face ≥2 black; feasible with 8; any fewer fails some face
Final Answer: $\\boxed{D}$

Ex (piecewise decreasing):
x<0: a^x ↓ ⇒ 0<a<1; x≥0: slope (\\tfrac14−a)<0 ⇒ a>\\tfrac14; at 0: f(0^-)=1>f(0^+)=2a ⇒ a<\\tfrac12 ⇒ a∈(\\tfrac14,\\tfrac12)
Final Answer: $\\boxed{\\left(\\tfrac14,\\tfrac12\\right)}$
"""
UNDO_ITERATION0_TEMPLATE = "Problem:\n{question}\n\nFollow the rules strictly and end with exactly one line:\nFinal Answer: $\\boxed{...}$"
SELF_REVISION = "self_revision"  # chat(x) + y_student + d + P_r + d (prompts.build_revision_prompt)
TEMPLATES = {"undo": UNDO_TUTOR_TEMPLATE, "undo_iteration0": UNDO_ITERATION0_TEMPLATE}
TEMPLATE_SYSTEM_PROMPTS = {"undo_iteration0": UNDO_ITERATION0_SYSTEM_PROMPT}
ANSWER_HEADER = "### new_answer"  # the tutor template's answer heading, cut from the kept rationale
FIELDS = ("question", "iteration", "teacher_answer", "student_answer", "score", "validation_examples")
_FIELD = re.compile(r"\{(" + "|".join(FIELDS) + r")\}")


@dataclass
class TeacherPromptSettings:
    """How the teacher is asked (see the module docstring); every template is a config value."""

    template: str = "undo"  # undo | undo_iteration0 | self_revision | a literal template with {question} ...
    first_template: str | None = None  # for problems without an earlier verified rationale; None = template
    system_prompt: str | None = (
        None  # None = the template's own (undo_iteration0) or the teacher prompt's; "" = none
    )
    example_template: str = (
        UNDO_VALIDATION_EXAMPLE_TEMPLATE  # one validation error ({question} {student_answer} {score})
    )
    no_previous_answer: str = "(none)"  # {teacher_answer} when no earlier verified rationale exists
    strip_answer_header: bool = True  # keep only the text after the last "### new_answer" line

    def __post_init__(self) -> None:
        for name in (self.template, self.first_template):
            if (
                name is not None
                and name != SELF_REVISION
                and name not in TEMPLATES
                and "{question}" not in name
            ):
                raise ValueError(
                    f"teacher_prompt template {name[:60]!r} is neither one of {[*TEMPLATES, SELF_REVISION]} "
                    "nor a template with a {question} placeholder"
                )


# ----------------------------------------------------------------------------------------------
# pure parts


def fill_fields(template: str, **values: str) -> str:
    """Substitute the named {field}s in one pass (values are never re-scanned; other braces are kept).

    Args:
        template: text with placeholders from FIELDS; a placeholder without a value is an error.
    """

    def sub(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise ValueError(f"template uses {{{match.group(1)}}} but no value is given")
        return values[match.group(1)]

    return _FIELD.sub(sub, template)


def format_score(score: float) -> str:
    """A score as the prompt shows it: "1", "0", or the accuracy over several samples ("0.25")."""
    return str(int(score)) if float(score).is_integer() else f"{score:.2f}"


@dataclass(frozen=True)
class StudentAnswer:
    response: str  # the answer shown to the teacher (the problem's first sample)
    correct: bool  # that sample's verdict (selects P_r in the self_revision layout)
    score: float  # accuracy over the problem's samples


def load_student_answers(records: list[dict[str, Any]]) -> dict[int, StudentAnswer]:
    """`evaluate` samples.jsonl records -> {problem_index: StudentAnswer} (the lowest sample_index shown)."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(int(rec["problem_index"]), []).append(rec)
    out = {}
    for index, rows in groups.items():
        rows.sort(key=lambda r: int(r["sample_index"]))
        score = sum(bool(r["correct"]) for r in rows) / len(rows)
        out[index] = StudentAnswer(rows[0]["response"], bool(rows[0]["correct"]), score)
    return out


def select_errors(
    records: list[dict[str, Any]], problems: dict[int, str], threshold: float, max_errors: int, seed: int
) -> list[dict[str, Any]]:
    """E_k: the validation problems the student got wrong (accuracy <= threshold over its samples).

    Args:
        records: the student's `evaluate` samples.jsonl on the validation set.
        problems: {problem_index: problem text} of that set.
        threshold: accuracy at or below which a problem is an error (0 = every sample wrong).
        max_errors: at most this many (a seeded random choice among all errors); 0 = none.
        seed: the choice's seed.
    Returns:
        [{problem_index, question, student_answer (the first wrong sample), score, ground_truth}] by index.
    """
    groups: dict[int, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(int(rec["problem_index"]), []).append(rec)
    errors = []
    for index in sorted(groups):
        rows = sorted(groups[index], key=lambda r: int(r["sample_index"]))
        score = sum(bool(r["correct"]) for r in rows) / len(rows)
        wrong = [r for r in rows if not r["correct"]]
        if score <= threshold and wrong:
            if index not in problems:
                raise ValueError(f"validation samples name problem {index}, which the validation set lacks")
            errors.append(
                {
                    "problem_index": index,
                    "question": problems[index],
                    "student_answer": wrong[0]["response"],
                    "score": score,
                    "ground_truth": wrong[0].get("ground_truth"),
                }
            )
    if len(errors) > max_errors:
        errors = sorted(random.Random(seed).sample(errors, max_errors), key=lambda e: e["problem_index"])
    return errors


def build_validation_examples(errors: list[dict[str, Any]], example_template: str) -> str:
    """The {validation_examples} block: each error rendered and preceded by a newline ("" for none)."""
    return "".join(
        "\n"
        + fill_fields(
            example_template,
            question=e["question"],
            student_answer=e["student_answer"],
            score=format_score(e["score"]),
        )
        for e in errors
    )


def build_tutor_text(
    template: str,
    question: str,
    student: StudentAnswer | None,
    previous: dict[str, Any] | None,
    validation_examples: str,
    no_previous_answer: str,
) -> str:
    """The teacher's user turn from a template name (TEMPLATES) or a literal template."""
    values = {"question": question, "validation_examples": validation_examples}
    values["iteration"] = str(previous["iteration"]) if previous else "0"
    values["teacher_answer"] = previous["rationale"] if previous else no_previous_answer
    if student is not None:
        values["student_answer"] = student.response
        values["score"] = format_score(student.score)
    return fill_fields(TEMPLATES.get(template, template), **values)


def template_for(settings: TeacherPromptSettings, previous: dict[str, Any] | None) -> str:
    return settings.template if previous is not None else (settings.first_template or settings.template)


def shows_examples(template: str) -> bool:
    """Whether prompts of this template show E_k (self_revision and undo_iteration0 have no place for it)."""
    return template != SELF_REVISION and "{validation_examples}" in TEMPLATES.get(template, template)


def needs_student(template: str) -> bool:
    return template == SELF_REVISION or "{student_answer}" in TEMPLATES.get(template, template)


def build_teacher_request(
    tokenizer: ChatTokenizer,
    question: str,
    student: StudentAnswer | None,
    previous: dict[str, Any] | None,
    validation_examples: str,
    settings: TeacherPromptSettings,
    prompt_cfg: PromptConfig,
) -> tuple[PromptTokens, str]:
    """The teacher's prompt (text and ids, with the teacher's chat template) and the template used."""
    name = template_for(settings, previous)
    if name == SELF_REVISION:
        if student is None:
            raise ValueError("the self_revision layout continues the student's answer: none was given")
        return build_revision_prompt(tokenizer, question, student.response, student.correct, prompt_cfg), name
    user = build_tutor_text(
        name, question, student, previous, validation_examples, settings.no_previous_answer
    )
    system = settings.system_prompt
    if system is None:
        system = TEMPLATE_SYSTEM_PROMPTS.get(name, prompt_cfg.system_prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    text = build_chat_prompt_text(tokenizer, messages, prompt_cfg)
    return PromptTokens(text=text, ids=encode_text(tokenizer, text)), name


def extract_rationale(text: str, strip_header: bool) -> str:
    """The rationale kept for SFT: the text after the last ANSWER_HEADER line (when asked and present)."""
    if not strip_header or ANSWER_HEADER not in text:
        return text
    return text[text.rindex(ANSWER_HEADER) + len(ANSWER_HEADER) :].lstrip("\n").rstrip()


def select_verified(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """R_k: the rationales whose kept text verifies and that ended on their own; the rest counted by reason.

    Returns:
        (kept records, {input, kept, dropped: {truncated, empty, no_reward, wrong}, wrong_reasons: {...}})
    """
    kept, dropped, wrong_reasons = [], {"truncated": 0, "empty": 0, "no_reward": 0, "wrong": 0}, {}
    for rec in records:
        if rec["finish_reason"] == "length":  # no end of turn to train on, and its answer may be cut
            dropped["truncated"] += 1
        elif not rec["completion"].strip():
            dropped["empty"] += 1
        elif rec["skip"] is not None:
            dropped["no_reward"] += 1
        elif not rec["correct"]:
            dropped["wrong"] += 1
            wrong_reasons[rec["reason"]] = wrong_reasons.get(rec["reason"], 0) + 1
        else:
            kept.append(rec)
    report = {"input": len(records), "kept": len(kept), "dropped": dropped, "wrong_reasons": wrong_reasons}
    return kept, report


def merge_rationales(
    previous: dict[int, dict[str, Any]], kept: list[dict[str, Any]], iteration: int
) -> list[dict[str, Any]]:
    """R_k as carried forward: the previous latest verified rationale per problem, replaced by this
    iteration's where one was kept (sorted by problem)."""
    merged = {i: dict(r) for i, r in previous.items()}
    for rec in kept:
        merged[rec["original_index"]] = {
            "original_index": rec["original_index"],
            "rationale": rec["completion"],
            "iteration": iteration,
        }
    return [merged[i] for i in sorted(merged)]


def compute_best_iteration(history: dict[int, float], min_delta: float = 0.0) -> int | None:
    """The iteration whose validation accuracy first exceeded every earlier one by more than min_delta."""
    best = None
    for it in sorted(history):
        if best is None or history[it] > history[best] + min_delta:
            best = it
    return best


def check_stop(history: dict[int, float], patience: int, min_delta: float, max_iterations: int) -> str | None:
    """Why the loop stops after the last iteration in `history` ("patience", "max_iterations"), or None.

    Args:
        history: {iteration (1, 2, ...): validation accuracy of that iteration's student}.
        patience: stop after this many iterations in a row without a new best.
    """
    if not history:
        return None
    last, best = max(history), compute_best_iteration(history, min_delta)
    if best is not None and last - best >= patience:
        return "patience"
    if last >= max_iterations:
        return "max_iterations"
    return None


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two HF tokenizers map text to the same ids (vocabulary and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens
