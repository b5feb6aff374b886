"""The isolation boundary: the bubblewrap (``bwrap``) command line that runs the sandbox runner.

The runner process ends up with:

- every namespace of its own (user except in the ``flat`` layout below, pid, network, ipc, mount,
  uts, cgroup where the kernel has it): no network at all (not even loopback to the host; abstract Unix sockets are per network
  namespace), no view of the trainer's processes, signals cannot reach them;
- uid/gid 65534 in its user namespace with no capabilities (``--cap-drop ALL``, and bwrap sets
  ``no_new_privs``), mapped to an unprivileged uid outside (see below), so ``RLIMIT_NPROC`` binds;
- a new root holding only, read-only, ``/usr/lib*`` and ``/lib*``, the Python prefix (its
  ``site-packages`` hidden) and ``/dev``'s standard nodes; no ``/proc``, no ``/etc``, no ``/home``
  or ``/root``, no repository, no filesystem Unix socket;
- one writable place, ``/tmp`` (also its working directory, ``$HOME`` and ``$TMPDIR``): a tmpfs
  capped with bwrap's ``--size`` (kernel-enforced; each file is capped again by RLIMIT_FSIZE),
  gone with the mount namespace, so nothing is left to clean up on the host;
- a new session (no terminal to inject into) and ``--die-with-parent``: killing bwrap kills the
  namespace's init, and with it every process of the pid namespace, forked daemons included.

Unprivileged uid when the trainer runs as root: bwrap started by root maps the sandbox uid to uid 0
outside, which the kernel exempts from RLIMIT_NPROC (a root fork bomb is bounded by wall time
only) and which owns most files. So a root trainer gets one of two layouts:

- ``nested``: an outer bwrap, still root, builds the read-only view with new pid/net/ipc/uts
  namespaces (it can read an interpreter under a 0700 ``/root``, and the parent directories it
  creates are world-traversable), drops to uid 65534 and execs the inner, unprivileged bwrap, which
  creates the user namespace and the final sandbox inside that view;
- ``flat``, where the host forbids unprivileged user namespaces: the outer bwrap alone is the
  sandbox, every namespace but the user one, and the runner starts as uid 65534 without
  capabilities (no user namespace to be root in). RLIMIT_NPROC then counts every uid-65534
  process of the host, so concurrent sandboxes share it (as they do in the nested layout on
  kernels before 5.14, which count per uid rather than per user namespace).

A non-root trainer runs the inner bwrap directly (``user``: itself outside, 65534 inside). Nested
user-namespace bwraps cannot mount a fresh ``/proc`` (the kernel refuses while the outer one is
partly covered), one more reason the sandbox has none: CPython does not need it.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Literal

SANDBOX_UID = 65534  # "nobody": inside the user namespace, and outside when the trainer is root
WORKDIR = "/tmp"
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
    "Arch: pacman -S bubblewrap)"
)
# run by the outer (root) bwrap: drop to the unprivileged uid, then exec the inner bwrap
_DROP_PRIVILEGES = (
    "import os, sys; uid = int(sys.argv[1]); os.setgroups([]); os.setgid(uid); os.setuid(uid); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)
_LIB_DIRS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/lib", "/lib64", "/lib32", "/libx32")


def find_bwrap() -> str | None:
    """The bwrap executable on PATH (or the Debian location), resolved; None when absent."""
    found = shutil.which("bwrap") or ("/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None)
    return os.path.realpath(found) if found else None


def python_executable() -> str:
    """The base interpreter (not a venv's symlink: the venv is not in the sandbox)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def read_only_view(extra_files: tuple[str, ...] = ()) -> list[str]:
    """bwrap arguments for the read-only part of the sandbox's file system."""
    links = [p for p in _LIB_DIRS if os.path.islink(p)]
    prefixes = list(dict.fromkeys(os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)))
    wanted = [p for p in _LIB_DIRS if p not in links and os.path.isdir(p)] + prefixes
    wanted += [*extra_files, python_executable()]
    roots = [p for p in dict.fromkeys(wanted) if not _covered(p, [r for r in wanted if r != p])]
    args: list[str] = []
    made: set[str] = set()
    for path in roots:
        # bwrap creates missing parents on its root tmpfs; --dir makes them 0755 so that the
        # unprivileged inner bwrap can walk through, e.g., a 0700 /root to an interpreter in it
        for parent in map(str, reversed(Path(path).parents[:-1])):
            if parent not in made:
                args += ["--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
    for path in links:
        args += ["--symlink", os.readlink(path), path]
    # hide the prefix's third-party packages (python -I -S would not import them anyway)
    scheme = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    for site in dict.fromkeys(os.path.realpath(sysconfig.get_path(k, vars=scheme)) for k in ("purelib", "platlib")):
        if os.path.isdir(site) and _covered(site, prefixes):
            args += ["--tmpfs", site, "--remount-ro", site]
    return args


_ENV = [
    "--clearenv",
    "--setenv",
    "HOME",
    WORKDIR,
    "--setenv",
    "TMPDIR",
    WORKDIR,
    "--setenv",
    "LANG",
    "C.UTF-8",
    "--setenv",
    "PATH",
    "/usr/bin:/bin",
]
Layout = Literal["user", "nested", "flat"]


def _workdir(disk_bytes: int) -> list[str]:
    """Standard /dev nodes (read-only), the capped tmpfs as /tmp and cwd, then / read-only."""
    return [
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
        "--size",
        str(disk_bytes),
        "--tmpfs",
        WORKDIR,
        "--chdir",
        WORKDIR,
        "--remount-ro",
        "/",
    ]


def inner_command(argv: list[str], disk_bytes: int, info_fd: int | None) -> list[str]:
    """The unprivileged bwrap: all namespaces, uid 65534, no caps, capped writable /tmp; the child
    cannot make user namespaces of its own (where it would hold every capability again)."""
    bwrap = find_bwrap()
    assert bwrap is not None
    info = ["--info-fd", str(info_fd)] if info_fd is not None else []
    return [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--disable-userns",
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        *info,
        *_ENV,
        *read_only_view(),
        *_workdir(disk_bytes),
        "--",
        *argv,
    ]


def outer_command(argv: list[str], info_fd: int, disk_bytes: int | None) -> list[str]:
    """The root bwrap: builds the view with every namespace but the user one, drops to uid 65534 and
    execs ``argv``. Nested layout (``disk_bytes`` None): ``argv`` is the inner bwrap, which needs a
    ``/proc`` and a mount point; flat layout: ``argv`` is the runner and this is the sandbox."""
    bwrap = find_bwrap()
    assert bwrap is not None
    if disk_bytes is None:
        view = [*read_only_view((bwrap,)), "--dev", "/dev", "--proc", "/proc", "--dir", WORKDIR, "--remount-ro", "/"]
    else:
        view = ["--hostname", "sandbox", *_ENV, *read_only_view(), *_workdir(disk_bytes)]
    return [
        bwrap,
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--info-fd",
        str(info_fd),
        "--cap-drop",
        "ALL",
        "--cap-add",
        "CAP_SETUID",
        "--cap-add",
        "CAP_SETGID",
        *(["--clearenv"] if disk_bytes is None else []),
        *view,
        "--",
        python_executable(),
        "-I",
        "-S",
        "-c",
        _DROP_PRIVILEGES,
        str(SANDBOX_UID),
        *argv,
    ]


def sandbox_command(argv: list[str], disk_bytes: int, info_fd: int, layout: Layout | None = None) -> list[str]:
    """The full command line that runs ``argv`` (an interpreter command) inside the sandbox;
    bwrap writes ``{"child-pid": N}`` (its namespace's init, as seen here) on ``info_fd``."""
    layout = layout or bwrap_layout()
    if layout == "user":
        return inner_command(argv, disk_bytes, info_fd)
    if layout == "nested":
        return outer_command(inner_command(argv, disk_bytes, None), info_fd, None)
    return outer_command(argv, info_fd, disk_bytes)


def _try(layout: Layout) -> str | None:
    """None if ``layout`` runs a trivial interpreter command here, else bwrap's last error line."""
    import subprocess

    read, write = os.pipe()
    try:
        argv = sandbox_command([python_executable(), "-I", "-S", "-c", "print('ok')"], 1 << 20, write, layout)
        probe = subprocess.run(argv, capture_output=True, timeout=30, pass_fds=(write,), env={})
    except (OSError, subprocess.SubprocessError) as err:
        return f"bubblewrap failed to start: {err}"
    finally:
        os.close(read)
        os.close(write)
    if probe.returncode == 0 and probe.stdout.strip() == b"ok":
        return None
    return (probe.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[Layout | None, str | None]:
    if find_bwrap() is None:
        return None, f"bubblewrap (bwrap) was not found on PATH; {INSTALL_HINT}"
    layouts: tuple[Layout, ...] = ("nested", "flat") if os.geteuid() == 0 else ("user",)
    reasons = []
    for layout in layouts:
        reason = _try(layout)
        if reason is None:
            return layout, None
        reasons.append(reason)
    return None, (
        f"bubblewrap cannot create the sandbox here ({reasons[0]}); unprivileged user namespaces may be "
        "disabled (sysctl kernel.unprivileged_userns_clone=1, or AppArmor's "
        "kernel.apparmor_restrict_unprivileged_userns=0)"
    )


def bwrap_layout() -> Layout | None:
    """How the sandbox is built here: ``user`` (non-root trainer), ``nested`` (root trainer) or
    ``flat`` (root trainer, unprivileged user namespaces unavailable); None when none works."""
    return _probe()[0]


def bwrap_problem() -> str | None:
    """Why the bwrap boundary cannot run here (None when it can); probed once per process."""
    return _probe()[1]
