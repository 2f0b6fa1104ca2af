"""A pool of killable worker processes with a hard wall-clock deadline per item.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop a task that hangs (sympy can spin for
minutes on a pathological expression), and math-verify's own timeout uses `signal.alarm`, which fails
off the main thread (threads, threaded/async Ray actors). Here each worker runs tasks on its own main
thread; a task that misses its deadline gets its worker SIGKILLed and replaced, and the caller receives
a timeout outcome. The caller never blocks longer than the deadline per item (plus a respawn), from any
thread or process.

    pool = WorkerPool("self_revision_training.shared.rewards.math_verify:verify_in_worker", num_workers=2, timeout_s=5)
    outcomes = pool.map([(response, answer, "boxed", 2), ...])   # -> list[Outcome], input order
"""

from __future__ import annotations

import atexit
import collections
import importlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_READY = "__ready__"


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "timeout" | "error" (the function raised) | "crashed" (the worker process died)
    value: Any = None  # the function's return value when status == "ok"
    error: str = ""  # traceback text or a short explanation otherwise
    seconds: float = 0.0  # wall time from dispatch to outcome


def _resolve(target: str) -> Any:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def _worker_main(conn: Connection, target: str, memory_limit_mb: int) -> None:
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    func = _resolve(target)
    conn.send(_READY)  # imports are done: deadlines start counting only now
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", func(*args)))
        except BaseException:  # noqa: BLE001 - reported to the caller, who decides
            conn.send(("error", traceback.format_exc(limit=5)))


class _Worker:
    """One worker: a fresh `python -m self_revision_training.shared.worker_pool` process on a socketpair.

    A plain subprocess rather than multiprocessing's spawn/forkserver, which re-import the caller's
    `__main__` in every worker (breaking unguarded scripts and notebooks) and copy its state.
    """

    def __init__(self, target: str, memory_limit_mb: int):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "self_revision_training.shared.worker_pool",
                target,
                str(memory_limit_mb),
                str(child_sock.fileno()),
            ],
            pass_fds=[child_sock.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self.conn: Connection = Connection(parent_sock.detach())
        self.ready = False
        self.task: int | None = None  # index of the item in flight
        self.started_at = 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


class WorkerPool:
    """`num_workers` processes running `target` ("module:function") with a per-item deadline."""

    def __init__(
        self,
        target: str,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 0,
    ):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"num_workers >= 1 and timeout_s > 0 required, got {num_workers}, {timeout_s}")
        self.target = target
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.num_respawns = 0  # workers replaced after a timeout or crash
        atexit.register(self.close)

    def _spawn(self) -> _Worker:
        return _Worker(self.target, self.memory_limit_mb)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.num_respawns += 1

    def map(self, items: list[tuple[Any, ...]]) -> list[Outcome]:
        """Run target(*args) for every args tuple; outcomes come back in input order."""
        with self._lock:
            return self._map_locked(list(items))

    def _map_locked(self, items: list[tuple[Any, ...]]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(items)
        if not items:
            return []
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        pending = collections.deque(range(len(items)))
        remaining = len(items)
        while remaining:
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    worker.task = pending.popleft()
                    worker.started_at = now
                    worker.conn.send(items[worker.task])
            busy = [w for w in self._workers if w.task is not None]
            deadlines = [w.started_at + self.timeout_s for w in busy]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            # A dead worker's socket reads as EOF, so waiting on the connections also catches crashes.
            ready_conns = wait([w.conn for w in self._workers], wait_s)
            for worker in list(self._workers):
                if worker.conn not in ready_conns:
                    continue
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    message = None
                if message == _READY:
                    worker.ready = True
                    continue
                if message is not None and worker.task is not None:
                    status, payload = message
                    seconds = time.monotonic() - worker.started_at
                    results[worker.task] = (
                        Outcome("ok", value=payload, seconds=seconds)
                        if status == "ok"
                        else Outcome("error", error=payload, seconds=seconds)
                    )
                    worker.task = None
                    remaining -= 1
                elif message is None:  # EOF: the worker died
                    code = worker.proc.wait()
                    if worker.task is not None:
                        results[worker.task] = Outcome(
                            "crashed",
                            error=f"worker exited with code {code}",
                            seconds=time.monotonic() - worker.started_at,
                        )
                        remaining -= 1
                    elif not worker.ready:
                        raise RuntimeError(
                            f"verifier worker for {self.target} died during start-up (exit code "
                            f"{code}); is the module importable in a fresh process?"
                        )
                    self._replace(worker)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task is not None and now - worker.started_at >= self.timeout_s:
                    results[worker.task] = Outcome(
                        "timeout",
                        error=f"no result within {self.timeout_s} s",
                        seconds=now - worker.started_at,
                    )
                    remaining -= 1
                    worker.task = None
                    self._replace(worker)
        return [r for r in results if r is not None]

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.close()
            finally:
                worker.kill()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _worker_main(Connection(int(sys.argv[3])), sys.argv[1], int(sys.argv[2]))
