"""The seccomp allow-list of each dvmm backend (issue 12).

Owns which system calls a backend may make once it serves, what happens
to the others, and how the filter reaches the kernel: through libseccomp's
own Python binding (Debian's ``python3-seccomp``; never hand-made BPF).

Binding: ``import seccomp`` when the interpreter has it (Debian's python3,
the Docker images); otherwise Debian's compiled module is loaded by path
from ``/usr/lib/python3/dist-packages`` when its ABI tag matches this
interpreter (the project's venv is built on another CPython 3.11 and does
not see Debian's site directory: adding that whole directory to the path
would shadow the venv's own packages); otherwise ``pyseccomp`` (PyPI, a
ctypes binding with the same API) if installed.  No binding at all is a
start-up error, not a silent fallback: ``--no-seccomp`` is the explicit way
to run without a filter.

Actions, per call:

* everything not listed -> ``EPERM``, logged by the kernel
  (``SECCOMP_FILTER_FLAG_LOG``: an ``audit: type=1326`` line with the
  syscall number in the kernel log).  EPERM rather than a kill for the
  unlisted rest because a rarely taken Python path (a lazy import probing
  a file, psutil reading /proc) then fails one operation with a clean
  ``PermissionError`` instead of taking the device down;
* :data:`KILL_CALLS` -> the backend is killed (``SECCOMP_RET_KILL_PROCESS``,
  SIGSYS): calls no backend makes and that only a compromised one would
  (``execve``, ``ptrace``, ``process_vm_writev``, module loading, mounts,
  namespace changes, ``bpf``...).  Only that backend dies; its supervisor
  logs "killed by SIGSYS" and restarts it by its policy;
* ``socket`` only for ``AF_UNIX`` (the display adds ``AF_INET``/``AF_INET6``
  for its VNC listener): a backend cannot reach a network;
* ``clone`` only with ``CLONE_THREAD`` (threads, never a new process);
  ``clone3`` fails with ``ENOSYS`` so glibc's ``pthread_create`` falls back
  to ``clone``, whose flags a filter can see (clone3's are behind a pointer);
* ``kill``/``tgkill``/``tkill`` only on the backend itself (fault hooks and
  crash points SIGKILL the process they run in).
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import logging
import os
import socket
import sys
from types import ModuleType

from .sandbox import SandboxError

log = logging.getLogger("dvmm.seccomp")

DEBIAN_DIST = "/usr/lib/python3/dist-packages"
CLONE_THREAD = 0x00010000
SCHED_OTHER = 0

#: What every backend uses after start-up: the Python runtime, threads,
#: ZeroMQ's ipc endpoints, the vhost-user socket with fd passing, eventfds,
#: positioned vector I/O on handed fds, psutil's /proc reads.
BASE_CALLS = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "close", "close_range", "lseek", "sendfile",
    "fstat", "newfstatat", "statx", "stat", "lstat", "fstatfs", "statfs",
    "openat", "open", "getdents64", "readlink", "readlinkat", "access", "faccessat",
    "faccessat2", "getcwd", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk", "msync", "mincore",
    "futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "set_tid_address",
    "membarrier", "arch_prctl", "prctl", "exit", "exit_group", "restart_syscall",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "getgroups", "getpgrp", "getsid", "getpriority",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "epoll_pwait2", "poll", "ppoll", "select", "pselect6",
    "eventfd", "eventfd2", "pipe", "pipe2", "dup", "dup2", "dup3", "fcntl",
    "socketpair", "bind", "listen", "accept", "accept4", "connect", "getsockname",
    "getpeername", "getsockopt", "setsockopt", "sendmsg", "recvmsg", "sendto", "recvfrom",
    "sendmmsg", "recvmmsg", "shutdown",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    "getrandom", "uname", "sysinfo", "getrlimit", "prlimit64", "getrusage", "times",
    "sched_getaffinity", "sched_yield", "sched_getparam", "sched_getscheduler", "getcpu",
    "fsync", "fdatasync", "fallocate", "ftruncate", "flock", "sync_file_range",
    "memfd_create", "fadvise64",
)

#: What only a compromised backend would call: the process is killed.
KILL_CALLS = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "bpf",
    "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "personality",
    "swapon", "swapoff", "reboot", "iopl", "ioperm", "open_by_handle_at",
    "name_to_handle_at", "fsopen", "fsmount", "move_mount", "open_tree", "mount_setattr",
)

#: ioctl requests a backend makes on the fds it holds: terminal probes
#: (TCGETS, FIONREAD), fd flags (FIONBIO, FIOCLEX, FIONCLEX) and the TAP
#: requests of ``dvmm_net.tap`` (linux/if_tun.h).
IOCTLS = (
    0x5401, 0x541B, 0x5421, 0x5451, 0x5450,
    0x800454D2,  # TUNGETIFF
    0x400454D0,  # TUNSETOFFLOAD
    0x800454CF,  # TUNGETFEATURES
    0x800454D7,  # TUNGETVNETHDRSZ
    0x400454D8,  # TUNSETVNETHDRSZ
    0x400454D9,  # TUNSETQUEUE
    0x400454DC, 0x800454DD,  # TUNSETVNETLE, TUNGETVNETLE
    0x400454D4, 0x800454D3,  # TUNSETSNDBUF, TUNGETSNDBUF
)

#: Per backend: the extra calls, and the socket families it may create.
POLICIES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "blk": (("io_uring_setup", "io_uring_enter", "io_uring_register"), (socket.AF_UNIX,)),
    "net": ((), (socket.AF_UNIX,)),
    "display": ((), (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)),
}


class SeccompError(SandboxError):
    """No libseccomp binding, an unknown policy, or the kernel refused the filter."""


def binding() -> ModuleType:
    """libseccomp's Python module (see the module doc for the search order)."""
    try:
        import seccomp  # type: ignore[import-not-found]

        return seccomp  # type: ignore[no-any-return]
    except ImportError:
        pass
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(DEBIAN_DIST, "seccomp" + suffix)
        if os.path.exists(path):
            loader = importlib.machinery.ExtensionFileLoader("seccomp", path)
            spec = importlib.util.spec_from_file_location("seccomp", path, loader=loader)
            if spec is not None:
                module = importlib.util.module_from_spec(spec)
                loader.exec_module(module)
                sys.modules["seccomp"] = module
                return module
    try:
        import pyseccomp  # type: ignore[import-not-found]

        return pyseccomp  # type: ignore[no-any-return]
    except ImportError:
        raise SeccompError("no libseccomp Python binding: install Debian's python3-seccomp "
                           "(or pyseccomp), or run with --no-seccomp") from None


def build(policy: str, sc: ModuleType | None = None) -> object:
    """The libseccomp filter of ``policy`` (not loaded)."""
    if policy not in POLICIES:
        raise SeccompError(f"no seccomp policy {policy!r} (known: {', '.join(POLICIES)})")
    sc = sc or binding()
    extra, families = POLICIES[policy]
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread, not just the caller
    f.set_attr(sc.Attr.CTL_LOG, 1)    # refusals reach the kernel log
    for name in (*BASE_CALLS, *extra):
        f.add_rule(sc.ALLOW, name)
    for name in KILL_CALLS:
        f.add_rule(sc.KILL_PROCESS, name)
    for family in families:
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    # libzmq sets each I/O thread it starts to SCHED_OTHER (its default
    # policy); a real-time policy stays refused.
    f.add_rule(sc.ALLOW, "sched_setscheduler", sc.Arg(1, sc.EQ, SCHED_OTHER))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    me = os.getpid()
    f.add_rule(sc.ALLOW, "kill", sc.Arg(0, sc.EQ, me))
    f.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, me))
    # ioctl only with these requests, compared on the low 32 bits the kernel
    # uses (a 64-bit comparison could be passed with high bits set); never
    # TIOCSTI, which would type into the terminal the backend logs to.
    for request in IOCTLS:
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    return f


def install(policy: str) -> None:
    """Build and load ``policy`` for the whole process."""
    f = build(policy)
    try:
        f.load()  # type: ignore[attr-defined]
    except (OSError, RuntimeError, ValueError) as exc:
        raise SeccompError(f"loading seccomp policy {policy}: {exc}") from None


def allowed_calls(policy: str) -> set[str]:
    """Every call ``policy`` lets through unconditionally (for tests and docs)."""
    return {*BASE_CALLS, *POLICIES[policy][0]}
