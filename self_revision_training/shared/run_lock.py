"""One writer per output directory: an exclusive lock held by the process that writes there.

Two runs into one directory would interleave their records (every problem collected twice, SFT and
Phase-2 checkpoints overwritten by each other). Every entry point that writes an output directory takes
its lock first; a second run exits at once with a message naming the holder's pid, host and command:

    with acquire_run_lock(output_dir, "collection"):   # raises RunLockError when another run holds it
        ...

The lock is a POSIX record lock (`fcntl.lockf`) on `<dir>/.sdzero.lock`, so it belongs to the process
that took it: the kernel drops it when that process exits or is killed (SIGKILL, OOM), and children it
forks (engines, grader workers) never hold it. A lock file that still names a process when its lock is
free was left by a run that died: it is taken over with a message naming the dead holder. Works on
network filesystems that support POSIX locks (NFSv4, Lustre with `flock`/`localflock` mounts).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sdzero.run_lock")

LOCK_FILE = ".sdzero.lock"

_held: set[str] = set()  # lock files this process holds (POSIX locks do not exclude the same process)
_held_guard = threading.Lock()


class RunLockError(RuntimeError):
    """Another live run holds the output directory's lock; the message names it."""


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "an unknown process"
    command = " ".join(info.get("argv") or [])[:200]
    return (
        f"pid {info.get('pid')} on {info.get('host')} (a {info.get('what', 'run')} started "
        f"{info.get('started')}: {command})"
    )


def _read_info(handle) -> dict[str, Any]:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "raw": text[:200]}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: Any) -> bool | None:
    """Whether `pid` is a live process on this host (None when that cannot be told)."""
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The held lock of one directory; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, directory: str | Path, what: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self._handle = None
        self.took_over: dict[str, Any] | None = None  # the dead holder whose lock file was left behind

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        with _held_guard:
            if key in _held:
                raise RunLockError(
                    f"{self.directory} is already locked by this process (pid {os.getpid()}): "
                    f"one {self.what} per output directory"
                )
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            handle = os.fdopen(fd, "r+", encoding="utf-8")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_info(handle)
                handle.close()  # we hold no lock on it, so closing releases nothing
                raise RunLockError(
                    f"{self.directory} is in use by another run: {_describe(holder)}. Two writers would "
                    f"duplicate or corrupt its outputs; wait for that run to finish or stop it "
                    f"(kill {holder.get('pid', '<pid>')}), or use another output directory."
                ) from None
            previous = _read_info(handle)
            if previous:
                # The kernel released the lock, so its holder is gone (a kill, a crash, a lost node).
                self.took_over = previous
                state = {False: "not running", True: "pid reused", None: "state unknown"}[
                    _pid_alive(previous.get("pid")) if previous.get("host") == socket.gethostname() else None
                ]
                log.warning(
                    "%s: taking over the stale lock of a run that ended without releasing it: %s; %s",
                    self.directory, _describe(previous), state,
                )  # fmt: skip
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "what": self.what,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv,
            }
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(info) + "\n")
            handle.flush()
            self._handle = handle
            _held.add(key)
        return self

    def release(self) -> None:
        """Give the lock up; an empty lock file means it was released cleanly."""
        if self._handle is None:
            return
        with _held_guard:
            try:
                self._handle.seek(0)
                self._handle.truncate()
                self._handle.flush()
            except OSError:
                pass  # the lock is released below (and by the kernel at exit) either way
            finally:
                fcntl.lockf(self._handle, fcntl.LOCK_UN)
                self._handle.close()
                self._handle = None
                _held.discard(str(self.path.resolve()))

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_run_lock(directory: str | Path, what: str) -> RunLock:
    """Take the exclusive lock of `directory` (created if missing) for a run of kind `what`.

    Args:
        directory: the output directory the run writes (for collection: the shard directory).
        what: the kind of run, for messages ("collection", "SFT", "distillation", "evaluation").
    Returns:
        The held `RunLock` (a context manager; the lock also ends with the process).
    Raises:
        RunLockError: another live process holds it; the message names its pid, host and command.
    """
    return RunLock(directory, what).acquire()


def check_run_lock(directory: str | Path) -> None:
    """Raise RunLockError if a live run holds `directory`'s lock (a probe: takes and gives it back)."""
    if not (Path(directory) / LOCK_FILE).exists():
        return
    RunLock(directory, "probe").acquire().release()


def lock_directory(directory: str | Path, what: str, program: str) -> RunLock:
    """`acquire_run_lock` for an entry point: another live holder ends the program with a message naming
    it (`SystemExit("program: ...")`) instead of a traceback. Use as `with lock_directory(out, ...):`."""
    try:
        return acquire_run_lock(directory, what)
    except RunLockError as exc:
        raise SystemExit(f"{program}: {exc}") from None
