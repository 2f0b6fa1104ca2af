"""A pool of killable worker processes with a hard wall-clock deadline per item.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop a task that hangs (sympy can spin for
minutes on a pathological expression), and math-verify's own timeout uses `signal.alarm`, which fails
off the main thread (threads, threaded/async Ray actors). Here each worker runs tasks on its own main
thread; a task that misses its deadline gets its worker SIGKILLed and replaced, and the caller receives
a timeout outcome. The caller never blocks longer than the deadline per item (plus a respawn), from any
thread or process.

Throughput: a worker receives a chunk of items in one message, runs them in order and streams back one
result per item, so it never idles waiting for the parent between items (with one item per round trip,
each item paid two process wake-ups, which on a busy machine cost more than a 1 ms verification). The
item at the head of a worker's chunk counts as started when its predecessor's result arrived (or when
the chunk was sent), so every item keeps its own deadline. On a timeout or crash only the running item
gets that outcome; the worker is replaced and its not-yet-run items go back to the pending queue.

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
_ROUNDS = 4  # chunking: a map's pending items are handed out in about this many rounds per worker
_MAX_CHUNK = 64  # items per message at most (about 0.1 s of math verification)


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "timeout" | "error" (the function raised) | "crashed" (the worker process died)
    value: Any = None  # the function's return value when status == "ok"
    error: str = ""  # traceback text or a short explanation otherwise
    seconds: float = 0.0  # wall time the item ran (timed by the worker for ok/error, by the parent otherwise)


def _resolve(target: str) -> Any:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def _worker_main(conn: Connection, target: str, memory_limit_mb: int, initializer: str = "") -> None:
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    func = _resolve(target)
    if initializer:
        _resolve(initializer)()  # one-time set-up and warm-up, outside every deadline
    conn.send(_READY)  # imports are done: deadlines start counting only now
    _with_reserved_frame_stack(_serve)(conn, func)


def _serve(conn: Connection, func: Any) -> None:
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        for args in chunk:
            _run_item(conn, func, args)


def _run_item(conn: Connection, func: Any, args: tuple[Any, ...]) -> None:
    # One message per item, sent as soon as it is done: the parent restarts the next item's deadline
    # from it, and a kill later in the chunk loses no finished result.
    start = time.monotonic()
    try:
        value = func(*args)
        conn.send(("ok", value, time.monotonic() - start))  # pickling errors land below
    except BaseException:  # noqa: BLE001 - reported to the caller, who decides
        conn.send(("error", traceback.format_exc(limit=5), time.monotonic() - start))


def _with_reserved_frame_stack(func: Any) -> Any:
    """`func` with a code object that reserves about 0.5 MiB of CPython's frame stack for its callees.

    CPython < 3.13 unmaps a 16 KiB frame-stack chunk whenever the call depth drops back below its start
    (python/cpython#142183; 3.13 caches one), so recursion oscillating around a chunk boundary, as ANTLR's
    closure() in math-verify's parser does, pays mmap + munmap + page faults per crossing: ~20% of a
    verification's CPU. A frame whose code claims a large evaluation stack gets a 1 MiB chunk of its own
    and every call below it stays there. The extra slots are never initialised; a frame object (made for
    a traceback) is sized by them too, which is why items' exceptions are caught in `_run_item`.
    """
    if sys.version_info >= (3, 13):
        return func
    code = func.__code__.replace(co_stacksize=func.__code__.co_stacksize + 65_600)  # > 512 KiB of slots
    return type(func)(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)


class _Worker:
    """One worker: a fresh `python -m self_revision_training.shared.worker_pool` process on a socketpair.

    A plain subprocess rather than multiprocessing's spawn/forkserver, which re-import the caller's
    `__main__` in every worker (breaking unguarded scripts and notebooks) and copy its state.
    """

    def __init__(self, target: str, memory_limit_mb: int, initializer: str = ""):
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
                initializer,
            ],
            pass_fds=[child_sock.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self.conn: Connection = Connection(parent_sock.detach())
        self.ready = False
        self.chunk: collections.deque[int] = collections.deque()  # sent, unanswered; [0] is running
        self.started_at = 0.0  # when chunk[0] started (parent's clock)

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
    """`num_workers` processes running `target` ("module:function") with a per-item deadline.

    `initializer` ("module:function", optional) runs once in every worker, respawns included, before the
    worker reports ready: set-up and warm-up there count against no item's deadline.
    """

    def __init__(
        self,
        target: str,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 0,
        initializer: str | None = None,
    ):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"num_workers >= 1 and timeout_s > 0 required, got {num_workers}, {timeout_s}")
        self.target = target
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.initializer = initializer or ""
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.num_respawns = 0  # workers replaced after a timeout or crash
        atexit.register(self.close)

    def _spawn(self) -> _Worker:
        return _Worker(self.target, self.memory_limit_mb, self.initializer)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.num_respawns += 1

    def map(self, items: list[tuple[Any, ...]]) -> list[Outcome]:
        """Run target(*args) for every args tuple; outcomes come back in input order."""
        with self._lock:
            try:
                return self._map_locked(list(items))
            except BaseException:
                # Workers may still hold items of this call; none of their results may reach a later one.
                self.close()
                raise

    def _chunk_size(self, num_pending: int) -> int:
        """Guided self-scheduling: each chunk is 1/(_ROUNDS * workers) of what is still pending. Early chunks
        are large (few messages and idle gaps); they shrink as the queue drains, so workers finish together
        even when item costs differ 20x. _MAX_CHUNK bounds a message's size and the items that wait behind a
        hanging one before they are re-dispatched."""
        return max(1, min(_MAX_CHUNK, -(-num_pending // (_ROUNDS * self.num_workers))))

    def _map_locked(self, items: list[tuple[Any, ...]]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(items)
        if not items:
            return []
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        pending = collections.deque(range(len(items)))
        while True:  # every index is pending, in some worker's chunk, or has its outcome
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and not worker.chunk and pending:
                    # Only idle workers get a chunk: they are blocked in recv(), so a large message
                    # cannot block this send (a busy worker's full socket buffer would stall the
                    # parent past every deadline).
                    size = self._chunk_size(len(pending))
                    worker.chunk.extend(pending.popleft() for _ in range(size))
                    worker.started_at = now
                    try:
                        worker.conn.send([items[i] for i in worker.chunk])
                    except OSError:
                        pass  # it died: its EOF is read below and charged to chunk[0]
            busy = [w for w in self._workers if w.chunk]
            if not busy and not pending:
                break
            deadlines = [w.started_at + self.timeout_s for w in busy]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            # A dead worker's socket reads as EOF, so waiting on the connections also catches crashes.
            ready_conns = wait([w.conn for w in self._workers], wait_s)
            for worker in list(self._workers):
                if worker.conn in ready_conns:
                    self._collect(worker, results, pending)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.chunk and now - worker.started_at >= self.timeout_s:
                    self._collect(worker, results, pending)  # results that raced the deadline
                if worker.chunk and now - worker.started_at >= self.timeout_s:
                    error = f"no result within {self.timeout_s} s"
                    self._fail_running(worker, "timeout", error, results, pending)
        return [r for r in results if r is not None]

    def _collect(
        self, worker: _Worker, results: list[Outcome | None], pending: collections.deque[int]
    ) -> None:
        """Read every message the worker has sent; on EOF charge its running item and replace it."""
        while True:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                self._on_exit(worker, results, pending)
                return
            if message == _READY:
                worker.ready = True
                continue
            status, payload, seconds = message
            index = worker.chunk.popleft()
            results[index] = (
                Outcome("ok", value=payload, seconds=seconds)
                if status == "ok"
                else Outcome("error", error=payload, seconds=seconds)
            )
            worker.started_at = time.monotonic()  # the next item of its chunk runs from now on

    def _on_exit(
        self, worker: _Worker, results: list[Outcome | None], pending: collections.deque[int]
    ) -> None:
        try:
            code = worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # EOF without an exit: treat it as dead anyway
            code = None
        if worker.chunk:
            self._fail_running(worker, "crashed", f"worker exited with code {code}", results, pending)
            return
        if not worker.ready:
            raise RuntimeError(
                f"verifier worker for {self.target} died during start-up (exit code "
                f"{code}); is the module importable in a fresh process?"
            )
        self._replace(worker)

    def _fail_running(
        self,
        worker: _Worker,
        status: str,
        error: str,
        results: list[Outcome | None],
        pending: collections.deque[int],
    ) -> None:
        """Give the running item its outcome, put the items that never ran first in line, replace the worker."""
        index = worker.chunk.popleft()
        results[index] = Outcome(status, error=error, seconds=time.monotonic() - worker.started_at)
        pending.extendleft(reversed(worker.chunk))
        worker.chunk.clear()
        self._replace(worker)

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
    _worker_main(Connection(int(sys.argv[3])), sys.argv[1], int(sys.argv[2]), sys.argv[4])
