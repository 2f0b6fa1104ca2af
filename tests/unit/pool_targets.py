"""Worker functions for test_worker_pool.py (importable by the pool's worker processes)."""

import os
import time


def echo(x):
    return x


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def boom(message):
    raise RuntimeError(message)


def die(code):
    os._exit(code)


def allocate(megabytes):
    return len(bytearray(megabytes * 1024 * 1024))


def act(kind, value):
    """One target for mixed batches: "ok" returns value, "sleep" sleeps value s, "raise", "exit", "hang"."""
    if kind == "raise":
        raise ValueError(value)
    if kind == "exit":
        os._exit(value)
    if kind == "hang":
        time.sleep(600)
    if kind == "sleep":
        time.sleep(value)
    return value
