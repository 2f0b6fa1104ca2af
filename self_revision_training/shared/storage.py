"""Durable file output: atomic writes, append-only JSONL, and the committed batch log of every data stage.

A crash or SIGKILL must lose no finished work: whole files are written to a temporary sibling and
renamed into place (`atomic_write_text`, `atomic_write_json`); record logs are appended one JSON line at
a time and fsync'ed per batch (`JsonlWriter`). `read_jsonl` ignores a torn last line (the only damage a
kill can do to an append-only file) and reports anything else as an error naming the file and line.

The batch log (`BatchLog`) is how every Phase-1 data stage (self-revision, rejection sampling, SSD,
teacher rationales) writes durably: each batch's records are appended in one fsync'ed write that ends
with a `batch_done` marker line, and a batch is committed once its marker is on disk. On reopen,
`recover_batch_log` cuts everything after the last marker (a batch killed mid-write), so a rerun resumes
with whole batches only and never duplicates a record.

JSONL is split on "\n" only: a JSON string may hold U+2028, U+0085 or a form feed, which
`str.splitlines()` would split on. Bytes that are not UTF-8 are an error naming the file, line and byte
offset. A full disk, an exceeded quota or a file-size limit is an error naming the file being written.
Files get the permissions the umask allows (0666 & ~umask), like any file `open()` creates.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A malformed data file; the message names the file and line."""


_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the filesystem's maximum",
}


def named_write_error(exc: OSError, path: str | Path) -> OSError:
    """`exc` as an OSError naming `path` when it is a full disk, quota or file-size error; else `exc`."""
    reason = _WRITE_FAILURES.get(exc.errno) if isinstance(exc.errno, int) else None
    if reason is None:
        return exc
    return OSError(
        exc.errno,
        f"cannot write {path}: {os.strerror(exc.errno)} ({reason}); make room or raise the limit and rerun "
        "(finished work is kept)",
    )


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; honour the umask like open()
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise named_write_error(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class JsonlWriter:
    """Append-only JSONL log; `write_batch` makes a batch durable before returning."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write_batch(self, records: Iterable[dict[str, Any]]) -> int:
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        try:
            self._handle.write("".join(lines))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:  # a partial line is cut on the next open (torn tail / uncommitted batch)
            raise named_write_error(exc, self.path) from exc
        return len(lines)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    """Drop an incomplete last line left by a kill during a write (no newline at the end)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        content = handle.read()
        cut = content.rfind(b"\n") + 1
        handle.truncate(cut)


def iter_lines(path: str | Path) -> Iterator[tuple[int, int, bytes]]:
    """(line_number, byte_offset, raw_line) of a file split on b"\\n" only; numbers start at 1.

    Streamed (attempt logs can be gigabytes). The raw line keeps its newline, so a last line without
    one (cut by a kill mid-write) can be told apart.
    """
    offset = 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            yield lineno, offset, raw
            offset += len(raw)


def decode_line(path: str | Path, lineno: int, offset: int, raw: bytes) -> str:
    """UTF-8 text of one raw line; DataFileError naming the file, line and byte offset otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise DataFileError(
            f"{path}:{lineno}: not valid UTF-8 at byte offset {offset + exc.start} of the file "
            f"(column {exc.start + 1}, bytes {bad!r}); the file must be UTF-8 encoded"
        ) from exc


def read_text_utf8(path: str | Path) -> str:
    """A whole text file; bytes that are not UTF-8 are a DataFileError naming the line and byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        decode_line(path, lineno, start, data[start : data.find(b"\n", exc.start) + 1 or len(data)])
        raise  # unreachable: decode_line raised on the same bytes


def iter_jsonl(path: str | Path, *, allow_torn_tail: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) from a JSONL file; line numbers start at 1, blank lines are skipped."""
    path = Path(path)
    for lineno, offset, raw in iter_lines(path):
        torn = not raw.endswith(b"\n")  # only the last line can lack its newline
        try:
            line = decode_line(path, lineno, offset, raw)
        except DataFileError:
            if torn and allow_torn_tail:  # a kill can cut a multi-byte character too
                return
            raise
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn and allow_torn_tail:
                return
            raise DataFileError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = True) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path, allow_torn_tail=allow_torn_tail)]


def read_json_list(path: str | Path) -> list[dict[str, Any]]:
    """A .json file holding a list of objects; errors name the file and the line or item."""
    path = Path(path)
    try:
        data = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataFileError(f"{path}: item {i} is a {type(rec).__name__}, expected an object")
    return data


# ----------------------------------------------------------------------------------------------
# the committed batch log

BATCH_DONE = "batch_done"  # the `type` of the marker line that commits a batch


def recover_batch_log(path: str | Path) -> int:
    """Cut everything after the last `batch_done` marker (a batch killed mid-write); return lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    committed = 0
    dropped = 0
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            offset += len(line)
            dropped += 1
            if not line.endswith(b"\n"):
                continue  # torn last line
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # only a torn or half-flushed tail can be unparseable; it is uncommitted
            if isinstance(record, dict) and record.get("type") == BATCH_DONE:
                committed, dropped = offset, 0
    if offset > committed:
        with open(path, "rb+") as handle:
            handle.truncate(committed)
    return dropped


def iter_committed_batches(
    path: str | Path, record_types: Iterable[str] | None = None
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(marker, records) per committed batch of a log that `recover_batch_log` has cleaned.

    Args:
        record_types: the record `type` values the log may hold (anything else is an error naming the
            line); None accepts any type.
    """
    allowed = None if record_types is None else set(record_types)
    pending: list[dict[str, Any]] = []
    if not Path(path).exists():
        return
    for lineno, record in iter_jsonl(path, allow_torn_tail=False):
        kind = record.get("type")
        if kind == BATCH_DONE:
            yield record, pending
            pending = []
        elif allowed is None or kind in allowed:
            pending.append(record)
        else:
            raise DataFileError(f"{path}:{lineno}: unknown record type {kind!r}")
    if pending:
        raise DataFileError(f"{path}: {len(pending)} records after the last batch_done marker (run recovery)")


class BatchLog:
    """An append-only log of committed batches (see the module docstring); reopening recovers it.

    with BatchLog(path) as log:          # cuts an uncommitted tail on open
        log.commit(records, indices=[...], seconds=1.2)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dropped_on_open = recover_batch_log(self.path)
        self._writer = JsonlWriter(self.path)

    def batches(self, record_types: Iterable[str] | None = None):
        """The committed batches, oldest first (see `iter_committed_batches`)."""
        return iter_committed_batches(self.path, record_types)

    def commit(self, records: list[dict[str, Any]], **marker: Any) -> dict[str, Any]:
        """Append `records` and their marker in one fsync'ed write; returns the marker."""
        line = {"type": BATCH_DONE, **marker}
        self._writer.write_batch([*records, line])
        return line

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> BatchLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
