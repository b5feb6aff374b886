"""Supervise one sandboxed child: feed its job, read its output under caps and a deadline, then
kill its whole process tree and wait until it is gone. Nothing the child writes can make this
block, grow without bound, or raise."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_STDERR_TAIL = 4096
_TEARDOWN_S = 5.0


@dataclasses.dataclass
class ChildOutput:
    lines: list[bytes]  # complete stdout lines, in order, within the cap
    stderr_tail: str
    returncode: int | None
    timed_out: bool
    overflowed: bool  # wrote more than the stdout cap (the run was killed there)
    wall_s: float


def _namespace_init(info_r: int, monitor_pid: int, deadline: float) -> int | None:
    """A pidfd for the sandbox's init, read from bwrap's info (``{"child-pid": N}``, written right
    after the namespaces are created) and checked to be the child of our bwrap, so that a
    recycled pid is never signalled. None if bwrap wrote no info (it failed early)."""
    info = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(info_r, selectors.EVENT_READ)
        while len(info) < 4096 and sel.select(max(0.0, deadline - time.perf_counter())):
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            info += chunk
    try:
        pid = int(json.loads(bytes(info))["child-pid"])
        fd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError, AttributeError):
        return None
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != monitor_pid:
        os.close(fd)
        return None
    return fd


def run_supervised(
    make_argv: Callable[[int | None], list[str]],
    job: bytes,
    wall_s: float,
    max_stdout: int,
    env: dict[str, str],
    *,
    info: bool,
    cwd: str | None = None,
    stop_line: bytes = b'{"done": true}',
) -> ChildOutput:
    """Run ``make_argv(info_fd)`` with ``job`` on stdin. With ``info`` the command is a bwrap given
    ``--info-fd``: the teardown SIGKILLs the namespace's init (the kernel then kills every process
    in the pid namespace) and waits for it; otherwise the child's process group is killed."""
    info_r, info_w = os.pipe() if info else (None, None)
    start = time.perf_counter()
    deadline = start + wall_s
    try:
        proc = subprocess.Popen(
            make_argv(info_w),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=(info_w,) if info_w is not None else (),
        )
    except BaseException:
        if info_r is not None:
            os.close(info_r)
        raise
    finally:
        if info_w is not None:
            os.close(info_w)
    init_fd = None
    out, err = bytearray(), bytearray()
    timed_out = overflowed = stopped = False
    sel = selectors.DefaultSelector()
    try:
        if info_r is not None:
            init_fd = _namespace_init(info_r, proc.pid, deadline)
        os.set_blocking(proc.stdin.fileno(), False)
        pending = memoryview(job)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while len(sel.get_map()) and not (stopped or overflowed):
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the child stopped reading: its loss
                        pending = pending[:0]
                    if not len(pending):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    out += chunk
                    overflowed = len(out) > max_stdout
                    stopped = (b"\n" + stop_line + b"\n") in (b"\n" + out[-len(stop_line) - 2 :])
                else:
                    err = (err + chunk)[-_STDERR_TAIL:]
    finally:
        sel.close()
        _kill_tree(proc, init_fd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
        if info_r is not None:
            os.close(info_r)
    lines = bytes(out[:max_stdout]).split(b"\n")[:-1]
    return ChildOutput(
        lines, err.decode("utf-8", "replace"), proc.returncode, timed_out, overflowed, time.perf_counter() - start
    )


def _kill_tree(proc: subprocess.Popen, init_fd: int | None) -> None:
    if init_fd is not None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(init_fd, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # our bwrap (or the unsafe tier's child) and its group
    proc.wait()
    if init_fd is not None:
        # the init exits only after the kernel has killed and reaped everything in its namespace
        sel = selectors.DefaultSelector()
        sel.register(init_fd, selectors.EVENT_READ)
        sel.select(_TEARDOWN_S)
        sel.close()
        os.close(init_fd)


def remove_tree(root: str) -> None:
    """Delete ``root`` without recursion or long paths: a hostile program may nest directories
    thousands deep (``shutil.rmtree`` then raises RecursionError). Subdirectories are renamed up
    into ``root`` until only files remain, each step relative to an open directory."""
    if not os.path.isdir(root):
        return
    counter, progress = 0, True
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while progress:
            progress = False
            for entry in list(os.scandir(root_fd)):
                if not entry.is_dir(follow_symlinks=False):
                    progress |= _quiet(os.unlink, entry.name, dir_fd=root_fd)
                    continue
                _quiet(os.chmod, entry.name, 0o700, dir_fd=root_fd)
                try:
                    sub_fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
                except OSError:
                    continue
                try:
                    for child in list(os.scandir(sub_fd)):
                        counter += 1
                        progress |= _quiet(
                            os.rename, child.name, f".flat-{counter}", src_dir_fd=sub_fd, dst_dir_fd=root_fd
                        )
                finally:
                    os.close(sub_fd)
                progress |= _quiet(os.rmdir, entry.name, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    _quiet(os.rmdir, root)


def _quiet(fn: Callable, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except OSError:
        return False
    return True
