"""Atomic writes and append-only JSONL that survive a kill mid-write."""

from __future__ import annotations

import json

import pytest

from self_revision_training.shared.storage import DataFileError, JsonlWriter, atomic_write_json, read_jsonl


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a" / "s.json", {"x": 1})
    atomic_write_json(tmp_path / "a" / "s.json", {"x": 2})
    assert json.loads((tmp_path / "a" / "s.json").read_text()) == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["s.json"]


def test_jsonl_round_trip_and_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlWriter(path) as writer:
        writer.write_batch([{"i": 0, "t": "ünï\ncode"}, {"i": 1}])
    with open(path, "a") as handle:
        handle.write('{"i": 2, "trunc')  # a kill in the middle of a write
    assert read_jsonl(path) == [{"i": 0, "t": "ünï\ncode"}, {"i": 1}]
    with pytest.raises(DataFileError, match="log.jsonl:3"):
        read_jsonl(path, allow_torn_tail=False)
    with JsonlWriter(path) as writer:  # reopening drops the torn line before appending
        writer.write_batch([{"i": 2}])
    assert [r["i"] for r in read_jsonl(path, allow_torn_tail=False)] == [0, 1, 2]


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(DataFileError, match=r"log\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataFileError, match="expected a JSON object"):
        read_jsonl(path)
