"""In-process hardening every dvmm backend applies to itself (issue 12).

Owns the two steps a backend takes on itself, whatever runner started it
(plain process, bubblewrap, Docker):

1. :func:`drop_privileges`, right after the backend has opened what it was
   handed and *before it starts any thread*: ``PR_SET_NO_NEW_PRIVS``, every
   capability out of the bounding, ambient, inheritable, permitted and
   effective sets.  Capabilities are per thread in Linux (``capset(2)``
   changes only the caller), so this must run while the process has one
   thread; the threads started later (control server, ZeroMQ's I/O thread,
   the blk engine's workers) inherit the empty sets.
2. :func:`confine`, once start-up is over (socket bound, control endpoint
   open), just before the serve loop: the backend's seccomp allow-list
   (:mod:`dvmm_shared.seccomp_policy`), loaded with ``SECCOMP_FILTER_FLAG_TSYNC``
   so every thread is filtered.

It does not own which system calls a backend may make (``seccomp_policy``),
nor what a backend can see of the host's files (that is the runner's
sandbox: bubblewrap's or Docker's mount namespace).

The command-line side (:func:`add_sandbox_args`): ``--no-seccomp`` skips
step 2 for debugging; ``--test-hooks`` arms the ``hostile`` control command
(:mod:`dvmm_shared.sandbox_hostile`) that the sandbox tests use to act as a
compromised backend.  The process is still uid 0 under the plain runner:
with no capabilities it keeps only what an owner has (DAC), which is why
file isolation needs a runner with a mount namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
from typing import NamedTuple

log = logging.getLogger("dvmm.sandbox")

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_CAPSET = 126  # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl)
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(Exception):
    """A hardening step the kernel refused (the backend stops: running
    without the promised confinement would be worse than not running)."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class Hardening(NamedTuple):
    """What a backend did to itself (logged, and shown by ``health``)."""

    no_new_privs: bool
    capabilities: int  # CapEff after the drop: 0
    seccomp: str       # the policy name, or "off"


def _prctl(option: int, arg: int = 0) -> int:
    rc = int(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))
    if rc < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl({option}) failed: {os.strerror(err)}")
    return rc


def last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_FILE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one in Linux 6.x


def set_no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS``: no execve can ever grant privileges again
    (setuid bits, file capabilities); also what an unprivileged seccomp
    filter requires (seccomp(2))."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def drop_capabilities() -> None:
    """Empty the bounding set (while CAP_SETPCAP is still effective), the
    ambient set, then inheritable, permitted and effective with capset(2)."""
    for cap in range(last_cap() + 1):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0:
            err = ctypes.get_errno()
            if err != 1 and err != 22:  # EPERM: no CAP_SETPCAP; EINVAL: unknown cap
                raise SandboxError(f"dropping capability {cap}: {os.strerror(err)}")
    # Older kernels have no ambient set (EINVAL); nothing to clear then.
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit words per set, all zero
    if _libc.syscall(SYS_CAPSET, ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"capset: {os.strerror(err)}")


def drop_privileges() -> None:
    """Step 1 (see the module doc): call before the first thread starts."""
    import threading

    if threading.active_count() != 1:
        raise SandboxError("capabilities must be dropped before any thread starts")
    set_no_new_privs()
    drop_capabilities()
    if proc_status_field("CapEff") != 0:
        raise SandboxError("capabilities are still effective after capset")


def confine(policy: str, enabled: bool = True) -> Hardening:
    """Step 2: load ``policy``'s seccomp filter on every thread (unless
    ``enabled`` is false: ``--no-seccomp``)."""
    if enabled:
        from .seccomp_policy import install

        install(policy)
        log.info("confined: no new privileges, no capabilities, seccomp policy %s", policy)
    else:
        log.warning("seccomp is off (--no-seccomp): every system call is allowed")
    return status(policy if enabled else "off")


def status(policy: str) -> Hardening:
    return Hardening(proc_status_field("NoNewPrivs") == 1, proc_status_field("CapEff"),
                     policy)


def proc_status_field(name: str, pid: int | str = "self") -> int:
    """A numeric field of ``/proc/PID/status`` (``CapEff`` is hex, the rest decimal)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return int(value.strip(), 16 if name.startswith("Cap") else 10)
    raise KeyError(f"/proc/{pid}/status has no {name}")


def add_sandbox_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-seccomp", dest="seccomp", action="store_false",
                   help="do not load the seccomp allow-list (debugging only: capabilities "
                        "are still dropped and no new privileges can be gained)")
    p.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
