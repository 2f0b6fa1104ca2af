"""`python -m self_distillation.analyze` end to end on the tiny random model: a rollout file in both formats
(self-contained rows graded by math-verify, and an evaluation's samples.jsonl with its dataset), two
teacher contexts, top-k and full vocabulary; the dump, the page and the statistics are written and agree."""

from __future__ import annotations

import json
import math

import pytest

from self_distillation import analyze
from self_distillation.token_dump import load_dump

PROBLEMS = [
    {"problem": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "7",
     "solution": "3 + 4 = 7. #### 7"},
    {"problem": "What is 12 * 5?", "answer": "60", "solution": "12 * 5 = 60. #### 60"},
]  # fmt: skip
RESPONSES = [
    (0, "We get 3 + 4 = 7, so the answer is \\boxed{7}."),  # correct
    (0, "We get 3 + 4 = 8, so the answer is \\boxed{8}."),  # wrong
    (1, "12 * 5 = 60 so \\boxed{60}"),
    (1, "12 * 5 = 50 so \\boxed{50}"),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tiny_model_dir, out, rollouts, *extra):
    return analyze.main(
        [
            f"student.path={tiny_model_dir}",
            f"teacher.path={tiny_model_dir}",
            f"rollouts={rollouts}",
            f"output_dir={out}",
            "prompt_source=config",
            "student.dtype=float32",
            "teacher.dtype=float32",
            "micro_batch_size=3",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    ("context", "top_k"), [("self_revision", "16"), ("reference_solution", "null")]
)  # fmt: skip
def test_analyze_self_contained_rollouts(tiny_model_dir, tiny_tokenizer, tmp_path, context, top_k):
    rows = [{**PROBLEMS[p], "response": text} for p, text in RESPONSES]
    rows[1]["correct"] = False  # a given r is used as is; the others are graded
    out = tmp_path / "out"
    summary = _run(tiny_model_dir, out, _write(tmp_path / "rollouts.jsonl", rows),
                   f"teacher_context={context}", f"loss.top_k={top_k}")  # fmt: skip
    for name in ("config.yaml", "dump.jsonl.gz", "tokens.html", "localization.json"):
        assert (out / name).is_file(), name
    header, records = load_dump(out / "dump.jsonl.gz")
    assert header["teacher_context"] == context and len(records) == len(rows) == summary["num_samples"]
    assert [r.reward for r in records] == [1, 0, 1, 0]  # math-verify graded rows 0, 2, 3
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for record, row in zip(records, rows, strict=True):
        ids = tiny_tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        assert record.token_ids == ids and record.num_tokens == len(ids)
        assert "".join(record.token_strings) == row["response"] + "<|im_end|>"
        assert len(record.fields.teacher_top_ids[0]) == 5 and all(math.isfinite(v) for v in record.fields.kl)
        assert record.reference_solution == row["solution"]
    if context == "self_revision":  # the teacher read y' and P_r chosen by r
        assert "Wait, this response is wrong" in records[1].teacher_context_text
        assert "Let me rephrase" in records[0].teacher_context_text
    else:
        assert "Reference Solution" in records[0].teacher_context_text
    kls = [v for r in records for v in r.fields.kl]
    assert summary["kl_mean"] == pytest.approx(math.fsum(kls) / len(kls))
    stats = json.loads((out / "localization.json").read_text())
    assert stats["metrics"]["localization/r0/num_samples"] == 2.0
    assert stats["metrics"]["localization/r0/answer_span_found"] == 2.0
    assert stats["metrics"]["localization/r0/departure_found"] == 1.0  # 8 and 50 are not in the references
    assert (out / "tokens.html").read_text().count('"context_name":') == len(rows)  # the page's embedded data


def test_analyze_reads_an_evaluation_samples_file(tiny_model_dir, tmp_path):
    dataset = _write(tmp_path / "test.jsonl", PROBLEMS)
    samples = [
        {"problem_index": p, "sample_index": k, "ground_truth": PROBLEMS[p]["answer"], "response": text,
         "finish_reason": "length" if k == 1 else "stop", "correct": k == 0}
        for k, (p, text) in enumerate(RESPONSES[:2])
    ]  # fmt: skip
    out = tmp_path / "out"
    summary = _run(
        tiny_model_dir, out, _write(tmp_path / "samples.jsonl", samples), f"dataset.path={dataset}"
    )
    _, records = load_dump(out / "dump.jsonl.gz")
    assert summary["num_samples"] == 2 and [r.sample_index for r in records] == [0, 1]
    assert (
        records[0].problem == PROBLEMS[0]["problem"]
        and records[0].reference_solution == PROBLEMS[0]["solution"]
    )
    assert (
        records[0].token_strings[-1] == "<|im_end|>" and records[1].token_strings[-1] != "<|im_end|>"
    )  # length


def test_analyze_refuses_rows_without_a_problem(tiny_model_dir, tmp_path):
    from self_revision_training.shared.storage import DataFileError

    rollouts = _write(tmp_path / "r.jsonl", [{"problem_index": 5, "response": "x", "correct": True}])
    with pytest.raises(DataFileError, match="problem_index 5"):
        _run(tiny_model_dir, tmp_path / "out", rollouts)
