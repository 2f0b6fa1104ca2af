"""Code verifier (MODE=code): run a candidate program on input/output tests in a sandbox.

    result = grade_code(response_text, [TestCase("1 2\\n", "3\\n")])   # -> CodeGradeResult

The program comes from the response's last fenced code block in a supported language (Python always,
C++ when g++ exists). Each compile and each test runs through `sandbox_exec.py` in its own temporary
directory with: a new network namespace (no connections), a private mount namespace (tmpfs over /tmp,
/var/tmp, /dev/shm), a new PID namespace (the whole process tree dies with the program), CPU-time,
address-space, file-size and process-count limits, and, when running as root, an unprivileged uid that
can write only its work directory. A wall-clock timeout kills the process group. Stdout is compared with
the expected output after whitespace normalisation (the token sequences must be equal).

`sandbox_capabilities()` probes once which isolation this machine allows; what is unavailable is
reported (and logged once), never silently assumed.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from self_revision_training.shared.problems import TestCase

logger = logging.getLogger(__name__)

_LAUNCHER = Path(__file__).with_name("sandbox_exec.py")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9+#_-]*)[^\n]*\n(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
LANGUAGE_ALIASES = {
    "python": "python",
    "py": "python",
    "python3": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "cc": "cpp",
    "cxx": "cpp",
}
SANDBOX_UID_BASE = 61000  # unprivileged uids used when running as root (one per concurrent run)
SANDBOX_UID_COUNT = 512


@dataclass
class SandboxLimits:
    time_limit_s: float = 2.0  # wall clock per test (CPU limit = ceil(this) + 1 s)
    memory_mb: int = 512  # address space per process
    file_size_mb: int = 16  # largest file the program may write (stdout included)
    max_processes: int = 32  # processes/threads of the sandbox uid
    compile_timeout_s: float = 30.0  # wall clock for g++
    compile_memory_mb: int = 2048
    max_output_chars: int = 4096  # of stdout/stderr kept in results


@dataclass(frozen=True)
class RunResult:
    status: str  # "ok" | "timeout" | "runtime_error" | "sandbox_error"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class CodeGradeResult:
    correct: bool
    reason: str  # passed | wrong_answer | timeout | runtime_error | compile_error | no_code | no_tests | unsupported_language | sandbox_error
    language: str | None
    passed: int
    total: int
    detail: str = ""


def extract_code(response: str) -> tuple[str, str] | None:
    """(language, code) of the last fenced block in a supported language; an untagged block counts as
    Python. None when the response has no usable block."""
    text = _THINK.sub("", response)
    blocks = _FENCE.findall(text)
    for tag, code in reversed(blocks):
        language = LANGUAGE_ALIASES.get(tag.lower())
        if language and code.strip():
            return language, code
    for tag, code in reversed(blocks):
        if not tag and code.strip():
            return "python", code
    return None


def outputs_match(expected: str, actual: str) -> bool:
    """Whitespace-normalised comparison: equal sequences of whitespace-separated tokens."""
    return expected.split() == actual.split()


def _world_executable(path: str) -> bool:
    """True when every directory on the real path is searchable and the file executable by others."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)


@functools.lru_cache(maxsize=1)
def sandbox_capabilities() -> dict[str, object]:
    """Probe once which isolation works here: {net, private_tmp, pid, uid_switch, python, gxx, notes}."""
    root = os.geteuid() == 0
    caps: dict[str, object] = {"net": False, "private_tmp": False, "pid": False, "uid_switch": root}
    notes = []
    for feature in ("net", "private_tmp", "pid"):
        spec = _spec(
            None,
            SandboxLimits(),
            net=feature == "net",
            private_tmp=feature == "private_tmp",
            pid=feature == "pid",
        )
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(spec), "--", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        caps[feature] = proc.returncode == 0
        if proc.returncode != 0:
            notes.append(f"{feature} isolation unavailable: {proc.stderr.strip()}")
    if not root:
        notes.append(
            "not root: programs run as the current user (file writes outside the work directory "
            "are limited only by that user's permissions)"
        )
    pythons = [shutil.which("python3"), "/usr/bin/python3", sys.executable]
    usable = [p for p in pythons if p and (not root or _world_executable(p))]
    caps["python"] = os.path.realpath(usable[0]) if usable else None
    caps["gxx"] = shutil.which("g++")
    if caps["python"] is None:
        notes.append("no Python interpreter is executable by the sandbox uid")
    caps["notes"] = notes
    for note in notes:
        logger.warning("code sandbox: %s", note)
    return caps


def _spec(
    uid: int | None,
    limits: SandboxLimits,
    *,
    net: bool,
    private_tmp: bool,
    pid: bool,
    cpu_seconds: int | None = None,
    memory_mb: int | None = None,
    home: str = "/",
) -> dict:
    return {
        "net": net,
        "private_tmp": private_tmp,
        "pid": pid,
        "uid": uid,
        "tmpfs_mb": limits.file_size_mb,
        "cpu_seconds": cpu_seconds or math.ceil(limits.time_limit_s) + 1,
        "memory_mb": memory_mb if memory_mb is not None else limits.memory_mb,
        "file_size_mb": limits.file_size_mb,
        "max_processes": limits.max_processes,
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home},
    }


@contextmanager
def _sandbox_uid():
    """Reserve an unprivileged uid for one run (root only); None otherwise."""
    if os.geteuid() != 0:
        yield None
        return
    lock_dir = Path(tempfile.gettempdir()) / "sdzero-sandbox-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_COUNT):
        handle = open(lock_dir / f"{uid}.lock", "w")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield uid
        finally:
            handle.close()
        return
    raise RuntimeError(f"all {SANDBOX_UID_COUNT} sandbox uids are busy")


def _clip(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", errors="replace")


def run_sandboxed(
    cmd: list[str],
    workdir: Path,
    stdin_text: str,
    limits: SandboxLimits,
    uid: int | None,
    *,
    timeout_s: float | None = None,
    cpu_seconds: int | None = None,
    memory_mb: int | None = None,
) -> RunResult:
    """Run `cmd` in `workdir` inside the sandbox; stdin from text, stdout/stderr via files in `workdir`."""
    caps = sandbox_capabilities()
    spec = _spec(
        uid,
        limits,
        net=bool(caps["net"]),
        private_tmp=bool(caps["private_tmp"]),
        pid=bool(caps["pid"]),
        cpu_seconds=cpu_seconds,
        memory_mb=memory_mb,
        home=str(workdir),
    )
    io_dir = Path(tempfile.mkdtemp(prefix="io-", dir=workdir.parent))  # outside the program's reach
    try:
        (io_dir / "stdin").write_text(stdin_text, encoding="utf-8")
        timeout = timeout_s if timeout_s is not None else limits.time_limit_s
        start = time.monotonic()
        with (
            open(io_dir / "stdin", "rb") as fin,
            open(io_dir / "stdout", "wb") as fout,
            open(io_dir / "stderr", "wb") as ferr,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(spec), "--", *cmd],
                cwd=workdir,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                start_new_session=True,
            )
            try:
                returncode = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the namespace's PID 1
                except ProcessLookupError:
                    pass
                returncode = proc.wait()
        seconds = time.monotonic() - start
        stdout = _clip((io_dir / "stdout").read_bytes(), 1 << 22)
        stderr = _clip((io_dir / "stderr").read_bytes(), limits.max_output_chars)
    finally:
        shutil.rmtree(io_dir, ignore_errors=True)
    if returncode == 125 and stderr.startswith("sandbox:"):
        return RunResult("sandbox_error", returncode, "", stderr, seconds)
    if timed_out or returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL) and seconds >= timeout * 0.9:
        return RunResult("timeout", returncode, stdout, stderr, seconds)
    status = "ok" if returncode == 0 else "runtime_error"
    return RunResult(status, returncode, stdout, stderr, seconds)


def _prepare_workdir(root: Path, uid: int | None) -> Path:
    workdir = root / "work"
    workdir.mkdir()
    if uid is not None:
        os.chown(root, uid, uid)
        os.chown(workdir, uid, uid)
    root.chmod(0o711)  # the uid may enter root only to reach workdir
    workdir.chmod(0o700)
    return workdir


def grade_code(response: str, tests: list[TestCase], limits: SandboxLimits | None = None) -> CodeGradeResult:
    """Correct iff the response's program passes every test (stops at the first failure)."""
    limits = limits or SandboxLimits()
    extracted = extract_code(response)
    if extracted is None:
        return CodeGradeResult(False, "no_code", None, 0, len(tests))
    language, code = extracted
    if not tests:
        return CodeGradeResult(False, "no_tests", language, 0, 0)
    caps = sandbox_capabilities()
    if (language == "cpp" and not caps["gxx"]) or (language == "python" and not caps["python"]):
        return CodeGradeResult(False, "unsupported_language", language, 0, len(tests))
    with tempfile.TemporaryDirectory(prefix="sdzero-code-") as tmp, _sandbox_uid() as uid:
        root = Path(tmp)
        workdir = _prepare_workdir(root, uid)
        if language == "python":
            source = workdir / "main.py"
            cmd = [str(caps["python"]), "-I", "main.py"]
        else:
            source = workdir / "main.cpp"
            cmd = ["./main"]
        source.write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(source, uid, uid)
        if language == "cpp":
            build = run_sandboxed(
                [str(caps["gxx"]), "-std=c++17", "-O2", "-pipe", "-o", "main", "main.cpp"],
                workdir,
                "",
                limits,
                uid,
                timeout_s=limits.compile_timeout_s,
                cpu_seconds=math.ceil(limits.compile_timeout_s),
                memory_mb=limits.compile_memory_mb,
            )
            if build.status != "ok":
                reason = "sandbox_error" if build.status == "sandbox_error" else "compile_error"
                return CodeGradeResult(False, reason, language, 0, len(tests), build.stderr)
        for index, test in enumerate(tests):
            run = run_sandboxed(cmd, workdir, test.input, limits, uid)
            if run.status != "ok":
                return CodeGradeResult(False, run.status, language, index, len(tests), run.stderr)
            if not outputs_match(test.output, run.stdout):
                detail = f"test {index}: expected {test.output[:200]!r}, got {run.stdout[:200]!r}"
                return CodeGradeResult(False, "wrong_answer", language, index, len(tests), detail)
    return CodeGradeResult(True, "passed", language, len(tests), len(tests))


def grade_code_batch(
    responses: list[str],
    tests: list[list[TestCase]],
    limits: SandboxLimits | None = None,
    num_workers: int = 2,
) -> list[CodeGradeResult]:
    """grade_code over many responses; sandboxed subprocesses run `num_workers` at a time."""
    if len(responses) != len(tests):
        raise ValueError(f"{len(responses)} responses but {len(tests)} test lists")
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(lambda rt: grade_code(rt[0], rt[1], limits), zip(responses, tests, strict=True)))


def describe_result(result: CodeGradeResult) -> dict:
    return asdict(result)
