"""Dataset loading: field detection, GSM8K answers, formats, and clear errors for bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from self_revision_training.shared.config import DatasetConfig
from self_revision_training.shared.problems import load_problems
from self_revision_training.shared.storage import DataFileError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_style_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"question": "2+2?", "answer": "2+2=4\n#### 4"},
            {"question": "Big?", "answer": "It is big.\n#### 1,200"},
        ],
    )
    problems, report = load_problems(DatasetConfig(path=str(path)))
    assert [(p.index, p.problem, p.answer) for p in problems] == [(0, "2+2?", "4"), (1, "Big?", "1,200")]
    assert (report.problem_field, report.answer_field, report.loaded) == ("question", "answer", 2)


def test_math_style_fields_and_solution_boxed(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"problem": "p1", "answer": r"\frac{1}{2}", "solution": "long"},
            {"problem": "p2", "solution": r"We get $\boxed{\{1,2\}}$ at the end."},
            {"prompt": "p3", "ground_truth": 7},
        ],
    )
    problems, _ = load_problems(DatasetConfig(path=str(path)))
    assert [p.answer for p in problems] == [r"\frac{1}{2}", r"\{1,2\}", "7"]


def test_explicit_fields_and_range(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": f"q{i}", "a": str(i)} for i in range(10)])
    problems, _ = load_problems(
        DatasetConfig(path=str(path), problem_field="q", answer_field="a", start_index=3, end_index=6)
    )
    assert [(p.index, p.problem, p.answer) for p in problems] == [
        (3, "q3", "3"),
        (4, "q4", "4"),
        (5, "q5", "5"),
    ]


def test_json_list_and_parquet(tmp_path):
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(load_problems(DatasetConfig(path=str(tmp_path / "d.json")))[0]) == 2
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    problems, _ = load_problems(DatasetConfig(path=str(tmp_path / "d.parquet")))
    assert [p.answer for p in problems] == ["1", "2"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"problem": "a", "answer": "1"}, '{"problem": "b", "answer": ', {"problem": "c", "answer": "3"}],
    )
    with pytest.raises(DataFileError, match=r"bad\.jsonl:2: not valid JSON"):
        load_problems(DatasetConfig(path=str(path)))
    problems, report = load_problems(DatasetConfig(path=str(path), on_bad_row="skip"))
    assert [p.problem for p in problems] == ["a", "c"]
    assert report.skipped == 1 and sum(report.skip_reasons.values()) == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"answer": "1"}, r"bad\.jsonl:2: no problem field"),
        ({"problem": "x"}, r"bad\.jsonl:2: no answer field"),
        ({"problem": "x", "answer": ["1"]}, r"bad\.jsonl:2: field 'answer' must be a string, got list"),
        ({"problem": "x", "answer": None}, r"bad\.jsonl:2: field 'answer' is null"),
        ({"problem": None, "answer": "1"}, r"bad\.jsonl:2: field 'problem' is null"),
        ({"problem": "x", "answer": True}, r"must be a string, got bool"),
        ({"problem": "x", "answer": "   "}, r"bad\.jsonl:2: field 'answer' is empty"),
        ({"problem": "", "answer": "1"}, r"bad\.jsonl:2: field 'problem' must be a non-empty string"),
        ({"problem": "x", "solution": "no box"}, r"has no \\boxed"),
        ([1, 2], r"bad\.jsonl:2: expected an object"),
    ],
)
def test_bad_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, row])
    with pytest.raises(DataFileError, match=message):
        load_problems(DatasetConfig(path=str(path)))
    problems, report = load_problems(DatasetConfig(path=str(path), on_bad_row="skip"))
    assert len(problems) == 1 and report.skipped == 1


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFileError, match="empty"):
        load_problems(DatasetConfig(path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataFileError, match="does not exist"):
        load_problems(DatasetConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataFileError, match="dataset.path is empty"):
        load_problems(DatasetConfig())
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"x": 1}, {"y": 2}])
    with pytest.raises(DataFileError, match="no usable rows"):
        load_problems(DatasetConfig(path=str(path), on_bad_row="skip"))
    path = write_jsonl(tmp_path / "short.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(DataFileError, match="past the end"):
        load_problems(DatasetConfig(path=str(path), start_index=5))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataFileError, match="unsupported file type"):
        load_problems(DatasetConfig(path=str(tmp_path / "d.csv")))


def test_hub_dataset_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFileError, match="could not load dataset 'someone/no-such-dataset-xyz'"):
        load_problems(DatasetConfig(path="someone/no-such-dataset-xyz"))


def test_code_mode_tests(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "add", "examples": [{"input": "1 2", "output": "3"}]},
            {"prompt": "add", "tests": json.dumps([["1 2", "3"], ["2 2", "4"]])},
            {"prompt": "add", "test_cases": {"inputs": ["1"], "outputs": ["1"]}},
        ],
    )
    problems, _ = load_problems(DatasetConfig(path=str(path), mode="code"))
    assert [len(p.tests) for p in problems] == [1, 2, 1]
    assert problems[1].tests[1].input == "2 2"
    bad = write_jsonl(tmp_path / "cb.jsonl", [{"prompt": "add", "examples": [{"in": "1"}]}])
    with pytest.raises(DataFileError, match=r"cb\.jsonl:1: test 0 is neither"):
        load_problems(DatasetConfig(path=str(bad), mode="code"))


def test_jsonl_rows_split_on_newline_only(tmp_path):
    # U+2028, U+0085 and a form feed are legal inside a JSON string (json.dumps writes them raw with
    # ensure_ascii=False); str.splitlines() splits on them, which broke the row and, with skip, shifted
    # every later row's index.
    rows = [
        {"problem": "a\u2028b", "answer": "1"},
        {"problem": "c\u0085d\x0ce", "answer": "2"},
        '{"problem": "broken", ',
        {"problem": "last", "answer": "4"},
    ]
    path = tmp_path / "u.jsonl"
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    problems, report = load_problems(DatasetConfig(path=str(path), on_bad_row="skip"))
    assert [(p.index, p.problem) for p in problems] == [(0, "a\u2028b"), (1, "c\u0085d\x0ce"), (3, "last")]
    assert report.skipped == 1
    with pytest.raises(DataFileError, match=r"u\.jsonl:3: not valid JSON"):
        load_problems(DatasetConfig(path=str(path)))


def test_non_utf8_bytes_name_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = b'{"problem": "ok", "answer": "1"}\n'
    path.write_bytes(good + b'{"problem": "caf\xe9", "answer": "2"}\n' + good)
    offset = len(good) + len(b'{"problem": "caf')
    with pytest.raises(DataFileError, match=rf"latin1\.jsonl:2: not valid UTF-8 at byte offset {offset}\b"):
        load_problems(DatasetConfig(path=str(path)))
    problems, report = load_problems(DatasetConfig(path=str(path), on_bad_row="skip"))
    assert [p.index for p in problems] == [0, 2]
    assert report.skip_reasons == {"not valid UTF-8": 1}
    (tmp_path / "l.json").write_bytes(b'[{"problem": "ok", "answer": "1"},\n {"problem": "\xff"}]')
    with pytest.raises(DataFileError, match=r"l\.json:2: not valid UTF-8"):
        load_problems(DatasetConfig(path=str(tmp_path / "l.json")))


def test_a_directory_path_has_its_own_message(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    for path in (tmp_path, tmp_path / "data.jsonl"):
        with pytest.raises(DataFileError, match="is a directory; name a .json, .jsonl or .parquet file"):
            load_problems(DatasetConfig(path=str(path)))


def test_duplicate_problems_are_counted_warned_and_optionally_dropped(tmp_path, caplog):
    rows = [
        {"problem": "2+2?", "answer": "4"},
        {"problem": "3+3?", "answer": "6"},
        {"problem": "2+2?", "answer": "4"},
        {"problem": " 2+2? ", "answer": "5"},  # same text (whitespace aside), another answer: a conflict
    ]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="sdzero.problems"):
        problems, report = load_problems(DatasetConfig(path=str(path)))
    assert len(problems) == 4 and (report.duplicates, report.duplicate_conflicts, report.deduplicated) == (
        2,
        1,
        0,
    )
    assert "2 rows repeat an earlier row's problem text (1 with a different answer)" in caplog.text
    problems, report = load_problems(DatasetConfig(path=str(path), deduplicate=True))
    assert [p.index for p in problems] == [0, 1] and report.deduplicated == 2 and report.loaded == 2


def test_unlabelled_rows_load_with_answers_optional_and_ground_truth_refuses_them(tmp_path):
    from self_revision_training.shared.config import GradingConfig
    from self_revision_training.shared.rewards import build_reward_source

    path = tmp_path / "mixed.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"mixed\.jsonl:2: no answer field"):
        load_problems(DatasetConfig(path=str(path)))
    problems, _ = load_problems(DatasetConfig(path=str(path), answers="optional"))
    assert [(p.problem, p.answer) for p in problems] == [("a", "1"), ("b", "")]
    with build_reward_source("ground_truth", "math", GradingConfig(num_workers=1)) as reward:
        with pytest.raises(ValueError, match=r"problems \[1\] have no answer.*majority_vote"):
            reward.score(problems, [["\\boxed{1}"], ["\\boxed{2}"]])
