"""Load problems (x, a) from a Hugging Face dataset or a local .json / .jsonl / .parquet file.

    problems, report = load_problems(DatasetConfig(path="data/gsm8k_train.jsonl"))

Fields are detected unless named: the problem from `problem`, `question`, `query`, `prompt` (first
present); the answer from `answer`, `ground_truth`, `solution` (first present). GSM8K worked answers
(`... #### 42`) keep the part after `####`; a `solution` field (a worked solution, as in MATH) keeps its
last `\\boxed{}`. The worked reference solution (what OPSD-style teachers read) comes from `solution` or
`reference_solution`, or is a GSM8K answer's whole worked text; every other field of the row is kept in
`Problem.extras`. In code mode, tests come from `tests`, `test_cases`, `examples` (a list of
{input, output} objects or [input, output] pairs, or that list as a JSON string).

A malformed line, bytes that are not UTF-8 (with their byte offset), a missing, null or empty field, an
answer of the wrong type or an empty dataset is a `DataFileError` naming the file and line (row for
HF/parquet). With `on_bad_row="skip"` bad rows are dropped and counted in the returned `LoadReport`
instead, never silently; the row index of every later row stays its position in the file (JSONL lines
are split on "\n" only, so a U+2028 or U+0085 inside a JSON string does not split a row).

Rows whose problem text repeats an earlier row's are counted (`LoadReport.duplicates`, and those with a
different answer in `duplicate_conflicts`) and warned about; `dataset.deduplicate=true` keeps the first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from self_revision_training.shared.answers import extract_boxed
from self_revision_training.shared.config import DatasetConfig
from self_revision_training.shared.storage import DataFileError, decode_line, iter_lines, read_text_utf8

log = logging.getLogger("sdzero.problems")

PROBLEM_FIELDS = ("problem", "question", "query", "prompt")
ANSWER_FIELDS = ("answer", "ground_truth", "solution")
SOLUTION_FIELDS = ("solution", "reference_solution")
TESTS_FIELDS = ("tests", "test_cases", "examples")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class TestCase:
    """One input/output test of a code problem (the sandbox compares whitespace-separated tokens)."""

    __test__ = False  # not a pytest test class

    input: str
    output: str


@dataclass(frozen=True)
class Problem:
    index: int  # row index in the source (stable across runs: resume keys on it)
    problem: str
    answer: str  # normalised ground truth ("" in code mode)
    tests: tuple[TestCase, ...] = ()  # code mode only
    solution: str | None = None  # worked reference solution, when the dataset has one
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # the row's other fields


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    loaded: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count
    problem_field: str | None = None
    answer_field: str | None = None
    duplicates: int = 0  # rows whose problem text repeats an earlier row's in the range
    duplicate_conflicts: int = 0  # ... of which with a different answer (or tests)
    deduplicated: int = 0  # duplicates dropped (dataset.deduplicate=true)


def _read_rows(cfg: DatasetConfig) -> tuple[list[tuple[str, Any]], str]:
    """-> ([(location, row)], source name); location is "file:line" or "name[split]:row"."""
    path = Path(cfg.path)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataFileError(
                f"dataset.path {path} is a directory; name a .json, .jsonl or .parquet file inside it"
            )
        if not path.is_file():
            raise DataFileError(f"dataset file {path} does not exist")
        if path.suffix == ".jsonl":
            rows = []
            for lineno, offset, raw in iter_lines(path):  # "\n" only: str.splitlines splits on U+2028
                location = f"{path}:{lineno}"
                try:
                    line = decode_line(path, lineno, offset, raw)
                except DataFileError as exc:
                    if cfg.on_bad_row == "error":
                        raise
                    rows.append((location, exc))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append((location, json.loads(line)))
                except json.JSONDecodeError as exc:
                    if cfg.on_bad_row == "error":
                        raise DataFileError(f"{location}: not valid JSON ({exc.msg})") from exc
                    rows.append((location, exc))
            return rows, str(path)
        if path.suffix == ".json":
            try:
                data = json.loads(read_text_utf8(path))
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
            if isinstance(data, dict):  # {"train": [...], ...} or {"data": [...]}
                key = cfg.split if cfg.split in data else "data" if "data" in data else None
                if key is None:
                    raise DataFileError(f"{path}: a JSON object needs a {cfg.split!r} or 'data' list")
                data = data[key]
            if not isinstance(data, list):
                raise DataFileError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            return [(f"{path}:record {i}", row) for i, row in enumerate(data)], str(path)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist())], str(path)
        raise DataFileError(f"{path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; re-raised with the name
        raise DataFileError(
            f"could not load dataset {cfg.path!r} (subset={cfg.subset}, split={cfg.split}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    name = f"{cfg.path}[{cfg.split}]"
    return [(f"{name}:row {i}", row) for i, row in enumerate(dataset)], name


def _pick_field(row: dict[str, Any], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit if explicit in row else None
    return next((name for name in candidates if name in row and row[name] is not None), None)


def _answer_text(value: Any, field_name: str, location: str) -> str:
    # Integers and floats are unambiguous answers (JSON datasets often store 42, not "42"); anything
    # else that is not a string (lists, objects, booleans, null) is rejected.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataFileError(
            f"{location}: field {field_name!r} must be a string, got "
            f"{type(value).__name__} {str(value)[:60]!r}"
        )
    text = str(value).strip()
    if field_name == "solution" or (field_name not in ("answer", "ground_truth") and "\\boxed" in text):
        boxed = extract_boxed(text)
        if boxed is None:
            raise DataFileError(f"{location}: field 'solution' has no \\boxed{{}} final answer")
        text = boxed
    elif "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    if not text:
        raise DataFileError(f"{location}: field {field_name!r} is empty")
    return text


def parse_tests(value: Any, location: str) -> tuple[TestCase, ...]:
    """Tests as a list of {input, output} objects or [input, output] pairs (or that list as JSON)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{location}: tests field is a string but not JSON ({exc.msg})") from exc
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:  # APPS-style columns
        value = list(zip(value["inputs"], value["outputs"], strict=False))
    if not isinstance(value, list):
        raise DataFileError(f"{location}: tests must be a list, got {type(value).__name__}")
    tests = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and "input" in item and "output" in item:
            pair = (item["input"], item["output"])
        elif isinstance(item, list | tuple) and len(item) == 2:
            pair = (item[0], item[1])
        else:
            raise DataFileError(f"{location}: test {i} is neither {{input, output}} nor a pair: {item!r:.80}")
        if not all(isinstance(p, str) for p in pair):
            raise DataFileError(f"{location}: test {i} input/output must be strings")
        tests.append(TestCase(input=pair[0], output=pair[1]))
    return tuple(tests)


def _solution(row: dict[str, Any], cfg: DatasetConfig, answer_field: str | None, location: str) -> str | None:
    """The worked reference solution: the solution field, else a GSM8K-style worked answer (with ####)."""
    name = _pick_field(row, cfg.solution_field, SOLUTION_FIELDS)
    if name is None and cfg.solution_field is not None:
        raise DataFileError(
            f"{location}: no solution field {cfg.solution_field!r}; fields present: {sorted(row)}"
        )
    if name is not None:
        value = row[name]
        if not isinstance(value, str) or not value.strip():
            raise DataFileError(f"{location}: field {name!r} must be a non-empty string")
        return value.strip()
    worked = row.get(answer_field) if answer_field else None
    return worked.strip() if isinstance(worked, str) and "####" in worked else None


def _extras(row: dict[str, Any], used: set[str | None]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


def _null_field(row: dict[str, Any], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    """The field that is present but null, when no usable field was found (its own message)."""
    names = (explicit,) if explicit is not None else candidates
    return next((name for name in names if name in row and row[name] is None), None)


def _parse_row(index: int, location: str, row: Any, cfg: DatasetConfig, report: LoadReport) -> Problem:
    if isinstance(row, DataFileError):
        raise row
    if isinstance(row, Exception):
        raise DataFileError(f"{location}: not valid JSON ({row})")
    if not isinstance(row, dict):
        raise DataFileError(f"{location}: expected an object with fields, got {type(row).__name__}")
    problem_field = _pick_field(row, cfg.problem_field, PROBLEM_FIELDS)
    if problem_field is not None and row[problem_field] is None:
        raise DataFileError(f"{location}: field {problem_field!r} is null")
    if problem_field is None:
        null = _null_field(row, cfg.problem_field, PROBLEM_FIELDS)
        if null is not None:
            raise DataFileError(f"{location}: field {null!r} is null")
        wanted = cfg.problem_field or " / ".join(PROBLEM_FIELDS)
        raise DataFileError(f"{location}: no problem field ({wanted}); fields present: {sorted(row)}")
    problem = row[problem_field]
    if not isinstance(problem, str) or not problem.strip():
        raise DataFileError(f"{location}: field {problem_field!r} must be a non-empty string")
    report.problem_field = problem_field
    if cfg.mode == "code":
        tests_field = _pick_field(row, cfg.tests_field, TESTS_FIELDS)
        if tests_field is None:
            wanted = cfg.tests_field or " / ".join(TESTS_FIELDS)
            raise DataFileError(f"{location}: no tests field ({wanted}); fields present: {sorted(row)}")
        tests = parse_tests(row[tests_field], location)
        if not tests:
            raise DataFileError(f"{location}: field {tests_field!r} holds no tests")
        return Problem(
            index=index,
            problem=problem,
            answer="",
            tests=tests,
            extras=_extras(row, {problem_field, tests_field}),
        )
    answer_field = _pick_field(row, cfg.answer_field, ANSWER_FIELDS)
    if answer_field is not None and row[answer_field] is None:
        raise DataFileError(f"{location}: field {answer_field!r} is null")
    if answer_field is None and cfg.answers == "optional":  # unlabelled: the reward source votes
        return Problem(index=index, problem=problem, answer="", extras=_extras(row, {problem_field}))
    if answer_field is None:
        null = _null_field(row, cfg.answer_field, ANSWER_FIELDS)
        if null is not None:
            raise DataFileError(f"{location}: field {null!r} is null (no answer to grade against)")
        wanted = cfg.answer_field or " / ".join(ANSWER_FIELDS)
        raise DataFileError(f"{location}: no answer field ({wanted}); fields present: {sorted(row)}")
    report.answer_field = answer_field
    solution = _solution(row, cfg, answer_field, location)
    return Problem(
        index=index,
        problem=problem,
        answer=_answer_text(row[answer_field], answer_field, location),
        solution=solution,
        extras=_extras(row, {problem_field, answer_field, *SOLUTION_FIELDS, cfg.solution_field}),
    )


def load_problems(cfg: DatasetConfig) -> tuple[list[Problem], LoadReport]:
    """Problems in rows [start_index, end_index) of the dataset, in stored order."""
    if not cfg.path:
        raise DataFileError("dataset.path is empty: name an HF dataset or a .json/.jsonl/.parquet file")
    rows, source = _read_rows(cfg)
    report = LoadReport(source=source)
    if not rows:
        raise DataFileError(f"dataset {source} is empty")
    end = len(rows) if cfg.end_index is None else min(cfg.end_index, len(rows))
    if cfg.start_index >= len(rows):
        raise DataFileError(
            f"dataset {source} has {len(rows)} rows; start_index={cfg.start_index} is past the end"
        )
    problems = []
    for index in range(cfg.start_index, end):
        location, row = rows[index]
        report.rows_read += 1
        try:
            problems.append(_parse_row(index, location, row, cfg, report))
        except DataFileError as exc:
            if cfg.on_bad_row == "error":
                raise
            reason = str(exc).split(": ", 1)[-1].split(";")[0]
            reason = "not valid UTF-8" if reason.startswith("not valid UTF-8") else reason[:80]
            report.skipped += 1
            report.skip_reasons[reason] = report.skip_reasons.get(reason, 0) + 1
    problems = _count_duplicates(problems, cfg, report)
    report.loaded = len(problems)
    if not problems:
        raise DataFileError(
            f"dataset {source}: no usable rows in [{cfg.start_index}, {end}) "
            f"({report.skipped} skipped: {report.skip_reasons})"
        )
    return problems, report


def _count_duplicates(problems: list[Problem], cfg: DatasetConfig, report: LoadReport) -> list[Problem]:
    """Count (and with `cfg.deduplicate` drop) rows whose problem text repeats an earlier row's."""
    first: dict[str, Problem] = {}
    kept: list[Problem] = []
    dropped_indices: list[int] = []
    for problem in problems:
        key = problem.problem.strip()
        earlier = first.get(key)
        if earlier is None:
            first[key] = problem
            kept.append(problem)
            continue
        report.duplicates += 1
        report.duplicate_conflicts += (earlier.answer, earlier.tests) != (problem.answer, problem.tests)
        if cfg.deduplicate:
            report.deduplicated += 1
            dropped_indices.append(problem.index)
        else:
            kept.append(problem)
    if report.duplicates:
        action = (
            f"dropped them (dataset.deduplicate=true; rows {dropped_indices[:10]}"
            f"{' ...' if len(dropped_indices) > 10 else ''})"
            if cfg.deduplicate
            else "kept them (set dataset.deduplicate=true to keep only the first of each)"
        )
        log.warning(
            "dataset %s: %d rows repeat an earlier row's problem text (%d with a different answer); %s",
            report.source, report.duplicates, report.duplicate_conflicts, action,
        )  # fmt: skip
    return kept
