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
