"""WorkerPool: hard per-item deadlines by killing workers, crash handling, use from threads."""

from __future__ import annotations

import threading
import time

import pytest

from self_revision_training.shared.worker_pool import WorkerPool


def test_results_in_order_and_hung_items_time_out():
    with WorkerPool("pool_targets:sleep_then", num_workers=2, timeout_s=1.0) as pool:
        items = [(0.0, 1), (60.0, 2), (0.0, 3), (60.0, 4), (0.0, 5)]
        start = time.monotonic()
        out = pool.map(items)
        elapsed = time.monotonic() - start
    assert [o.status for o in out] == ["ok", "timeout", "ok", "timeout", "ok"]
    assert [o.value for o in out if o.status == "ok"] == [1, 3, 5]
    assert elapsed < 10, elapsed  # two 60 s sleeps were cut at 1 s each
    assert pool.num_respawns == 2


def test_errors_and_crashes_are_reported_and_the_pool_recovers():
    with WorkerPool("pool_targets:boom", num_workers=1, timeout_s=5.0) as pool:
        out = pool.map([("bad input",)])
        assert out[0].status == "error" and "bad input" in out[0].error
    with WorkerPool("pool_targets:die", num_workers=1, timeout_s=5.0) as pool:
        out = pool.map([(3,), (4,)])
        assert [o.status for o in out] == ["crashed", "crashed"]
        assert "code 3" in out[0].error


def test_memory_limit():
    with WorkerPool("pool_targets:allocate", num_workers=1, timeout_s=10.0, memory_limit_mb=512) as pool:
        small, huge = pool.map([(16,), (2048,)])
    assert small.status == "ok" and small.value == 16 * 1024 * 1024
    assert huge.status == "error" and "MemoryError" in huge.error


def test_usable_from_threads():
    with WorkerPool("pool_targets:echo", num_workers=2, timeout_s=5.0) as pool:
        results: dict[int, list] = {}

        def run(k: int) -> None:
            results[k] = [o.value for o in pool.map([(k * 10 + i,) for i in range(5)])]

        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert results == {k: [k * 10 + i for i in range(5)] for k in range(3)}


def test_bad_arguments_and_unimportable_target():
    with pytest.raises(ValueError):
        WorkerPool("pool_targets:echo", num_workers=0)
    with (
        WorkerPool("no_such_module_xyz:f", num_workers=1) as pool,
        pytest.raises(RuntimeError, match="start-up"),
    ):
        pool.map([(1,)])
