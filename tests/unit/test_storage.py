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


def test_jsonl_splits_on_newline_only_and_names_bad_bytes(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlWriter(path) as writer:  # ensure_ascii=False: U+2028 / U+0085 are written raw
        writer.write_batch([{"t": "a\u2028b\u0085c"}, {"t": "d"}])
    assert read_jsonl(path) == [{"t": "a\u2028b\u0085c"}, {"t": "d"}]
    with open(path, "ab") as handle:
        handle.write(b'{"t": "caf\xe9"}\n')
    with pytest.raises(DataFileError, match=r"log\.jsonl:3: not valid UTF-8 at byte offset \d+"):
        read_jsonl(path)
    path.write_bytes(b'{"t": 1}\n{"t": "\xe2\x80')  # a kill cut a multi-byte character: a torn tail
    assert read_jsonl(path) == [{"t": 1}]


def test_write_errors_name_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from self_revision_training.shared import storage

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    target = tmp_path / "summary.json"
    with pytest.raises(
        OSError, match=rf"cannot write {target}: No space left on device \(the disk is full\)"
    ) as exc:
        atomic_write_json(target, {"x": 1})
    assert exc.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []  # no temp file left behind
    log = tmp_path / "attempts.jsonl"
    with JsonlWriter(log) as writer, pytest.raises(OSError, match=f"cannot write {log}"):
        writer.write_batch([{"i": 1}])


def test_file_size_limit_names_the_file(tmp_path):
    # A real EFBIG: a child process with a 64 KiB file-size limit (Python ignores SIGXFSZ, so write fails).
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from self_revision_training.shared.storage import JsonlWriter\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n"
        "    with JsonlWriter(sys.argv[1]) as w:\n"
        "        w.write_batch([{'x': 'y' * 100_000}])\n"
        "except OSError as exc:\n"
        "    print(exc.errno, exc)\n"
    )
    target = tmp_path / "big.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.startswith("27 ")
        and f"cannot write {target}" in out.stdout
        and "file-size limit" in out.stdout
    )


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    import os
    import stat

    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "s.json", {"x": 1})
        with open(tmp_path / "plain.txt", "w") as handle:  # what open() gives, for comparison
            handle.write("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "s.json").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
