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


# Batching: one worker gets the items in chunks (several per message); these pin what a chunk must not change.


def test_a_hanging_item_mid_batch_costs_only_itself():
    timeout = 1.0
    with WorkerPool("pool_targets:act", num_workers=1, timeout_s=timeout) as pool:
        pool.map([("ok", -1)])  # start the worker outside the timed region
        items = [("ok", i) for i in range(40)]
        items[5] = ("hang", 5)  # inside the first chunk of a single worker, with items after it
        start = time.monotonic()
        out = pool.map(items)
        elapsed = time.monotonic() - start
        assert pool.num_respawns == 1
    assert elapsed < timeout + 2.0, elapsed
    assert out[5].status == "timeout" and out[5].seconds >= timeout
    assert [(o.status, o.value) for i, o in enumerate(out) if i != 5] == [
        ("ok", i) for i in range(40) if i != 5
    ]


def test_each_item_of_a_batch_has_its_own_deadline():
    # 20 items of 0.15 s with a 0.5 s deadline: a chunk of 4+ items runs longer than one deadline.
    with WorkerPool("pool_targets:act", num_workers=1, timeout_s=0.5) as pool:
        out = pool.map([("sleep", 0.15)] * 20)
        assert pool.num_respawns == 0
    assert [o.status for o in out] == ["ok"] * 20


def test_a_crash_mid_batch_costs_only_its_item():
    with WorkerPool("pool_targets:act", num_workers=1, timeout_s=5.0) as pool:
        items = [("ok", i) for i in range(40)]
        items[5] = ("exit", 7)
        out = pool.map(items)
        assert pool.num_respawns == 1
        assert [o.value for o in pool.map([("ok", i) for i in range(3)])] == [0, 1, 2]  # still usable
    assert out[5].status == "crashed" and "code 7" in out[5].error
    assert [(o.status, o.value) for i, o in enumerate(out) if i != 5] == [
        ("ok", i) for i in range(40) if i != 5
    ]


def test_batched_outcomes_equal_one_item_calls():
    items = [("ok", i) for i in range(30)]
    items[3] = ("raise", "bad input")
    items[8] = ("exit", 3)
    items[12] = ("hang", 0)
    items[13] = ("sleep", 0.05)
    items[20] = ("raise", "worse input")
    items[21] = ("exit", 4)
    with WorkerPool("pool_targets:act", num_workers=2, timeout_s=1.0) as pool:
        batched = pool.map(items)
        single = [pool.map([item])[0] for item in items]
    assert [(o.status, o.value, o.error) for o in batched] == [(o.status, o.value, o.error) for o in single]
    assert [o.status for o in batched].count("ok") == 25
    assert "worse input" in batched[20].error and "code 4" in batched[21].error
