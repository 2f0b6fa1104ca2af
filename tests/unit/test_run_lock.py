"""One writer per output directory: the run lock excludes a second process, names the holder, dies with it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from self_revision_training.shared.run_lock import (
    LOCK_FILE,
    RunLockError,
    acquire_run_lock,
    check_run_lock,
)

HOLDER = textwrap.dedent(
    """
    import sys, time
    from self_revision_training.shared.run_lock import acquire_run_lock
    lock = acquire_run_lock(sys.argv[1], "collection")
    print("locked", flush=True)
    time.sleep(120)
    """
)


def start_holder(directory) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_acquire_release_and_reacquire(tmp_path):
    with acquire_run_lock(tmp_path / "out", "SFT") as lock:
        assert lock.held
        info = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["what"] == "SFT"
        with pytest.raises(RunLockError, match="already locked by this process"):
            acquire_run_lock(tmp_path / "out", "SFT")
    assert (tmp_path / "out" / LOCK_FILE).read_text() == ""  # released cleanly: not stale
    acquire_run_lock(tmp_path / "out", "SFT").release()


def test_a_second_process_is_refused_with_the_holders_pid_until_the_holder_dies(tmp_path, caplog):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another run: pid {holder.pid} on .*collection"):
            acquire_run_lock(tmp_path, "collection")
        with pytest.raises(RunLockError, match=f"kill {holder.pid}"):
            check_run_lock(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops the lock with the process
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="sdzero.run_lock"):
        lock = acquire_run_lock(tmp_path, "collection")
    assert lock.took_over["pid"] == holder.pid
    assert (
        f"taking over the stale lock of a run that ended without releasing it: pid {holder.pid}"
        in caplog.text
    )
    assert "not running" in caplog.text
    lock.release()


def test_children_of_the_holder_do_not_hold_the_lock(tmp_path):
    # POSIX record locks are not inherited by fork: an engine or grader worker left behind by a killed
    # run never blocks the rerun.
    script = textwrap.dedent(
        """
        import os, sys, time
        from self_revision_training.shared.run_lock import acquire_run_lock
        acquire_run_lock(sys.argv[1], "collection")
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        acquire_run_lock(tmp_path, "collection").release()  # the forked child is still alive
        os.kill(child, 0)
    finally:
        os.kill(child, signal.SIGKILL)
