"""The UNDO outer loop (`self_distillation.undo`) with scripted stages: real evaluation and regeneration code on
scripted student/teacher backends, scripted training (tests/fixtures/undo_scripted.py). The stopping rule and
export, the teacher's prompts byte for byte, the verified filter, resume after SIGKILL, the Phase-2 form and
the validation/test disjointness check."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import undo_scripted
from undo_scripted import make_model, student_answer

from self_distillation import undo
from self_revision_training import undo_data
from self_revision_training.shared.config import ConfigError
from self_revision_training.shared.storage import iter_committed_batches, read_jsonl

REPO = Path(__file__).resolve().parents[2]
TRAIN = [(3, 4), (5, 3), (13, 2), (2, 6), (7, 1), (4, 4), (6, 9), (8, 1), (9, 3), (11, 5), (12, 7), (10, 2)]
ACCURACY = {1: 0.50, 2: 0.55, 3: 0.57, 4: 0.56, 5: 0.60}  # the scripted validation accuracy of S_k


def train_text(a: int, b: int) -> str:
    return f"What is {a} + {b}? Hint: $\\{{{a}\\}}$ and $\\frac{{{b}}}{{1}}$."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("undo_assets")
    return {
        "template": tiny_model_dir,
        "base": make_model(tiny_model_dir, root / "base", {"role": "student", "val_accuracy": 0.40}),
        "teacher": make_model(tiny_model_dir, root / "teacher", {"role": "teacher"}),
        "train": write_jsonl(root / "train.jsonl", [{"problem": train_text(a, b), "answer": str(a + b)} for a, b in TRAIN]),
        "val": write_jsonl(root / "val.jsonl", [{"problem": f"What is {i} + 1000?", "answer": str(i + 1000)} for i in range(100)]),
        "test": write_jsonl(root / "test.jsonl", [{"problem": f"What is {i} + 2000?", "answer": str(i + 2000)} for i in range(20)]),
    }  # fmt: skip


def loop_args(assets, out: Path, **overrides) -> list[str]:
    base = {
        "student.path": assets["base"],
        "teacher.path": assets["teacher"],
        "train_data.path": assets["train"],
        "val_data.path": assets["val"],
        "output_dir": out,
        "max_iterations": 5,
        "evaluate.config": "null",
        "sft.config": "null",
        "backend.name": "hf",
        "grading.num_workers": 1,
        "regenerate.overrides.sampling.max_tokens": 256,
        "regenerate.overrides.max_errors": 2,
        "regenerate.overrides.batch_size": 4,
        **overrides,
    }
    return [f"{k}={v}" for k, v in base.items()]


def run_scripted(assets, out: Path, accuracy=ACCURACY, **overrides):
    stages = undo_scripted.ScriptedStages(assets["template"], accuracy)
    return undo.main(loop_args(assets, out, **overrides), runner=stages), stages


@pytest.fixture(scope="module")
def loop(assets, tmp_path_factory):
    """The scripted loop run to its stop (validation 0.50, 0.55, 0.57, 0.56, [0.60])."""
    with pytest.MonkeyPatch.context() as mp:
        undo_scripted.install(mp.setattr)
        out = tmp_path_factory.mktemp("undo") / "run"
        summary, stages = run_scripted(assets, out)
    return out, summary, stages


def test_the_loop_stops_after_patience_runs_out_and_exports_the_best_iteration(loop, assets):
    out, summary, stages = loop
    assert summary["stop_reason"] == "patience" and summary["best_iteration"] == 3  # 0.56 did not beat 0.57
    assert [r["val"]["mean"] for r in summary["iterations"]] == [0.40, 0.50, 0.55, 0.57, 0.56]
    assert {c[0].split("/")[0] for c in stages.calls} == {f"iter-{k}" for k in range(5)}  # exactly 4 trained
    assert (out / "best").resolve() == (out / "iter-3" / "sft" / "final").resolve()
    assert json.loads((out / "best" / "scripted_role.json").read_text())["val_accuracy"] == 0.57
    assert summary["best_model"] == str(out / "iter-3" / "sft" / "final")
    assert json.loads((out / "summary.json").read_text())["best_iteration"] == 3
    for k in range(1, 5):
        it = out / f"iter-{k}"
        for name in (
            "answers/samples.jsonl",
            "regen/sft.jsonl",
            "regen/rationales.jsonl",
            "regen/errors.jsonl",
            "regen/summary.json",
            "sft/final/config.json",
            "eval_val/summary.json",
        ):
            assert (it / name).is_file(), it / name  # fmt: skip
    sft_calls = [argv for _, module, argv in stages.calls if module == "self_revision_training.sft"]
    inits = [
        json.loads(next(a for a in argv if a.startswith("model.path=")).split("=", 1)[1])
        for argv in sft_calls
    ]
    assert inits == [str(assets["base"])] * 4  # student_init=base
    assert all('data.layout="prompt_completion"' in argv for argv in sft_calls)
    budget = json.loads((out / "budget.json").read_text())
    assert budget["samples_generated"] == 4 * len(TRAIN) * 2  # student answers + teacher rationales
    assert budget["validation_samples"] == 5 * 100 and budget["tokens_trained"] == 100 * (1 + 2 + 3 + 4)


def test_only_verified_rationales_enter_r_k_and_the_drops_are_counted(loop, assets, tmp_path, caplog):
    out, _, _ = loop
    kept = read_jsonl(out / "iter-1" / "regen" / "sft.jsonl")
    expected = [i for i, (a, b) in enumerate(TRAIN) if a * b % 5 and a != 13]  # wrong: a*b % 5 == 0; 13: cut
    assert [r["original_index"] for r in kept] == expected
    assert all(r["completion"].startswith("Add the units.") and r["source"] == "undo" for r in kept)
    assert all(r["completion_ids"] is None for r in kept)  # the "### new_answer" heading was cut
    report = json.loads((out / "iter-1" / "regen" / "summary.json").read_text())["filter"]
    assert report["kept"] == len(expected) and report["dropped"] == {
        "truncated": 1,
        "empty": 0,
        "no_reward": 0,
        "wrong": 3,
    }
    # the same stage on its own: the counts are logged
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="sdzero.undo_data"):
        undo_scripted.install(mp.setattr)
        args = [f"model.path={assets['teacher']}", f"dataset.path={assets['train']}", "grading.num_workers=1",
                "teacher_prompt.template=undo_iteration0", "sampling.max_tokens=256", f"output_dir={tmp_path / 'r'}"]  # fmt: skip
        undo_data.main(args)
    assert (
        f"kept {len(expected)} of {len(TRAIN)} rationales" in caplog.text and "'truncated': 1" in caplog.text
    )


GOLDEN_ITER2_PROBLEM0 = (
    "<|im_start|>user\n"
    "You are an AI tutor tasked with improving a student's understanding of mathematical\n"
    "problem-solving. You will be given a question, previous teacher answers, a student's answer,\n"
    "and a score. Your job is to analyze these inputs and create a new answer that will help\n"
    "the student learn better.\n\n"
    "Here are some examples of the task:\n"
    "### question:\n"
    "What is 3 + 4? Hint: $\\{3\\}$ and $\\frac{4}{1}$.\n\n"
    "### ITERATION 1 teacher answer:\n"
    "Add the units. $3 + 4 = 7$.\n\nFinal Answer: \\boxed{7}\n\n"
    "### student answer:\n"
    "$\\frac{3}{1} + 4 = 7$, so the answer is \\boxed{7}.\n\n"
    "### score:\n"
    "1\n\n"
    "------------similar such examples from the validation set------------\n"
    "\n### question:\nWhat is 74 + 1000?\n\n### student answer:\n"
    "$\\frac{74}{1} + 1000 = 1075$, so the answer is \\boxed{1075}.\n\n### score:\n0\n"
    "\n### question:\nWhat is 98 + 1000?\n\n### student answer:\n"
    "$\\frac{98}{1} + 1000 = 1099$, so the answer is \\boxed{1099}.\n\n### score:\n0\n"
    "\n"
    "First, carefully analyze the student's answer. Compare it to the teacher's past answers\n"
    "and identify any mistakes or areas where the student's reasoning could be improved.\n"
    "Then regenerate a new improved rationale.\n\n"
    "Your new answer should:\n"
    "1. Use clear, step-by-step reasoning\n"
    "2. Explain any concepts the student may have misunderstood\n"
    "3. Provide additional context or examples if necessary\n"
    "4. Use the same calculation format as the teacher's answer (LaTeX if present).\n"
    "5. All final answers must end inside \\boxed{}.\n\n"
    "Write your new answer using the format:\n\n"
    "### new_answer\n"
    "[Step-by-step reasoning with calculations]\n\n"
    "Final Answer: [Correct boxed answer]\n"
    "<|im_end|>\n<|im_start|>assistant\n"
)


def test_iteration_k_prompts_hold_exactly_the_previous_students_answers_scores_and_errors(loop):
    out, _, _ = loop
    records = {
        r["original_index"]: r
        for _, b in iter_committed_batches(out / "iter-2/regen/shard-0-of-1/samples.jsonl")
        for r in b
    }
    assert records[0]["prompt_text"] == GOLDEN_ITER2_PROBLEM0  # byte for byte; LaTeX braces intact
    errors = read_jsonl(out / "iter-2" / "regen" / "errors.jsonl")  # E_2: S_1 (val 0.50) is wrong on i >= 50
    assert [e["problem_index"] for e in errors] == [74, 98]
    regen = json.loads((out / "iter-2" / "regen" / "summary.json").read_text())
    assert regen["validation_errors_selected"] == 2 and regen["prompts_with_validation_errors"] == len(TRAIN)
    block = "".join(
        f"\n### question:\n{e['question']}\n\n### student answer:\n{e['student_answer']}\n\n### score:\n0\n"
        for e in errors
    )
    previous = {r["original_index"]: r for r in read_jsonl(out / "iter-1" / "regen" / "rationales.jsonl")}
    for i, (a, b) in enumerate(TRAIN):
        text = records[i]["prompt_text"]
        answer = student_answer(a, b, ACCURACY[1])  # what S_1 (iteration 1's student) answers
        score = "1" if f"= {a + b}$" in answer else "0"
        assert f"### student answer:\n{answer}\n\n### score:\n{score}\n\n---" in text
        assert f"------------\n{block}\nFirst, carefully" in text
        if i in previous:  # R_1's rationale, else none
            assert f"### ITERATION 1 teacher answer:\n{previous[i]['rationale']}\n\n### student" in text
        else:
            assert "### ITERATION 0 teacher answer:\n(none)\n\n### student" in text
        assert records[i]["student_answer"] == answer


@pytest.mark.parametrize("point", sorted(undo_scripted.KILL_POINTS))
def test_killed_loop_resumes_at_its_stage_with_the_same_rationales(loop, assets, tmp_path, point):
    """SIGKILL after iteration 2's regeneration (or inside it, after its first committed batch), rerun: the
    same R_2, and the loop goes on at the stage it was in."""
    reference, _, _ = loop
    out = tmp_path / point
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "fixtures")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fixtures" / "undo_scripted.py"), point, str(assets["template"]),
         json.dumps(ACCURACY), *loop_args(assets, out, max_iterations=2)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]  # it died at the kill point
    assert not (out / "iter-2" / "sft").exists()
    with pytest.MonkeyPatch.context() as mp:
        undo_scripted.BACKENDS.clear()
        undo_scripted.install(mp.setattr)
        summary, stages = run_scripted(assets, out, max_iterations=2)
    names = [c[0] for c in stages.calls]
    if point == "after_regenerate":
        assert names == ["iter-2/sft", "iter-2/eval_val"]  # continues at iteration 2's SFT
    else:
        assert names == ["iter-2/regen", "iter-2/sft", "iter-2/eval_val"]
        asked = [p for b in undo_scripted.BACKENDS if b.role["role"] == "teacher" for p in b.prompts]
        assert len(asked) == len(TRAIN) - 4  # the committed first batch was not asked again
    for name in ("sft.jsonl", "rationales.jsonl", "errors.jsonl"):
        assert (out / "iter-2/regen" / name).read_bytes() == (reference / "iter-2/regen" / name).read_bytes()
    assert summary["best_iteration"] == 2 and summary["stop_reason"] == "max_iterations"


def test_phase_2_form_resyncs_the_teacher_to_the_best_student(assets, tmp_path, monkeypatch):
    undo_scripted.install(monkeypatch.setattr)
    out = tmp_path / "distill"
    summary, stages = run_scripted(
        assets,
        out,
        {1: 0.5, 2: 0.45, 3: 0.6},
        inner="distill",
        student_init="previous",
        max_iterations=3,
        patience=2,
        **{"test_data.path": assets["test"]},
    )
    calls = [argv for _, module, argv in stages.calls if module == "self_distillation.train"]
    teacher = [
        json.loads(next(a for a in argv if a.startswith("teacher.path=")).split("=", 1)[1]) for argv in calls
    ]
    student = [
        json.loads(next(a for a in argv if a.startswith("student.path=")).split("=", 1)[1]) for argv in calls
    ]
    iter1 = str(out / "iter-1" / "distill" / "final")
    assert teacher == [str(assets["teacher"]), iter1, iter1]  # iteration 2 was worse: the teacher stays S_1
    assert student == [str(assets["base"]), iter1, str(out / "iter-2" / "distill" / "final")]
    assert summary["best_iteration"] == 3 and summary["stop_reason"] == "max_iterations"
    assert (out / "best").resolve() == (out / "iter-3" / "distill" / "final").resolve()
    assert not any(module == "self_revision_training.undo_data" for _, module, _ in stages.calls)
    tests = [
        r["test"]["mean"] for r in summary["iterations"]
    ]  # the test set: evaluated, reported, never used
    assert len(tests) == 4 and all(
        (out / f"iter-{k}" / "eval_test" / "samples.jsonl").is_file() for k in range(4)
    )
    assert not any(
        "test.jsonl" in a for _, m, argv in stages.calls if m != "self_distillation.evaluate" for a in argv
    )


def test_a_validation_set_that_overlaps_the_test_set_is_refused(assets, tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [{"problem": "What is 7 + 1000?", "answer": "1007"}])
    with pytest.raises(ConfigError, match=rf"{assets['val']}.*{test}.*1 problems"):
        undo.main(loop_args(assets, tmp_path / "out", **{"test_data.path": test}), runner=None)
    assert not (tmp_path / "out" / "iter-0").exists()


def test_stage_settings_are_checked_before_anything_runs(assets, tmp_path):
    with pytest.raises(ConfigError, match="iter-1/regen.*teacher_prompt.templat"):
        undo.main(loop_args(assets, tmp_path / "out", **{"regenerate.overrides.teacher_prompt.templat": "x"}))
    with pytest.raises(SystemExit):
        undo.main(loop_args(assets, tmp_path / "out2", inner="rl"))
