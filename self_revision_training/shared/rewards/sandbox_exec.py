"""Sandbox launcher: isolate, limit, drop privileges, then exec a candidate program.

Run as `python -I -S sandbox_exec.py '<json spec>' -- cmd args...` by `code_sandbox.py` (never imported:
it must start fast and use only the standard library). The spec says which isolation to apply; each
requested step that fails exits with code 125 and a message on stderr, so the caller never believes a
program ran isolated when it did not.

Steps, in order:
1. `unshare` new namespaces: network (no interfaces but a down loopback: no connections at all),
   mount (tmpfs over /tmp, /var/tmp, /dev/shm: writes there vanish with the sandbox), PID (the program
   is PID 1 of its namespace: killing it kills every process it forked). As non-root, a user namespace
   is created first so the others are allowed.
2. fork: the child becomes PID 1 of the new PID namespace; this launcher waits and passes its status on.
3. In the child: resource limits (CPU seconds, address space, file size, processes, no core files),
   then (as root) switch to an unprivileged uid/gid that owns only the work directory, then exec.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
SANDBOX_FAILURE = 125

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(message):
    os.write(2, f"sandbox: {message}\n".encode())
    os._exit(SANDBOX_FAILURE)


def _check(result, what):
    if result != 0:
        _fail(f"{what} failed: {os.strerror(ctypes.get_errno())}")


def _write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def _unshare(spec):
    flags = 0
    if spec["net"]:
        flags |= CLONE_NEWNET
    if spec["private_tmp"]:
        flags |= CLONE_NEWNS
    if spec["pid"]:
        flags |= CLONE_NEWPID
    if not flags:
        return
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(CLONE_NEWUSER | flags), "unshare(user+namespaces)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    else:
        _check(_libc.unshare(flags), "unshare(namespaces)")
    if spec["private_tmp"]:
        # The work directory usually lives under /tmp: keep a handle on it, hide /tmp behind a tmpfs,
        # then bind the real work directory back at its own path so absolute paths keep working.
        workdir = os.getcwd()
        work_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount(make / private)")
        options = f"size={spec['tmpfs_mb']}m,mode=1777".encode()
        for target in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(target):
                _check(
                    _libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
                    f"mount(tmpfs on {target})",
                )
        if not os.path.isdir(workdir):
            os.makedirs(workdir)
            _check(
                _libc.mount(f"/proc/self/fd/{work_fd}".encode(), workdir.encode(), None, MS_BIND, None),
                "mount(bind the work directory)",
            )
        os.fchdir(work_fd)
        os.close(work_fd)


def _limit(spec):
    cpu = spec["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if spec["memory_mb"] > 0:
        limit = spec["memory_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    size = spec["file_size_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["max_processes"], spec["max_processes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _drop_privileges(spec):
    uid = spec.get("uid")
    if uid is None:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        _fail("could not switch uid")


def main():
    spec = json.loads(sys.argv[1])
    if sys.argv[2] != "--" or len(sys.argv) < 4:
        _fail("usage: sandbox_exec.py SPEC -- cmd [args...]")
    cmd = sys.argv[3:]
    _unshare(spec)
    pid = os.fork()
    if pid == 0:
        try:
            _limit(spec)
            _drop_privileges(spec)
            os.execvpe(cmd[0], cmd, spec["env"])
        except OSError as exc:
            _fail(f"exec {cmd[0]} failed: {exc}")
    # Forward termination to the namespace's PID 1 (killing it tears down the whole namespace).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
