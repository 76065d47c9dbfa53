"""The backends' seccomp allow-lists (issue 12), loaded for real.

Each case runs in a fresh interpreter that drops its privileges and loads
one policy, then tries a call: an allowed call works, an unlisted one
fails with EPERM, a call on the kill list ends that process with SIGSYS
(and nothing else), and the filter covers threads started before it.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from dvmm_shared import seccomp_policy

PRELUDE = """
import errno, os, socket, sys, threading
from dvmm_shared import sandbox
sandbox.drop_privileges()
sandbox.confine(sys.argv[1])
"""


def confined(policy: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + code, policy], capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_binding_is_libseccomps_own() -> None:
    sc = seccomp_policy.binding()
    assert hasattr(sc, "SyscallFilter") and hasattr(sc, "KILL_PROCESS")


def test_every_policy_builds_and_names_known_calls() -> None:
    for policy in seccomp_policy.POLICIES:
        seccomp_policy.build(policy)  # an unknown syscall name would raise here
    assert not set(seccomp_policy.KILL_CALLS) & seccomp_policy.allowed_calls("blk")
    with pytest.raises(seccomp_policy.SeccompError, match="no seccomp policy 'gpu'"):
        seccomp_policy.build("gpu")


def test_allowed_calls_still_work_under_the_filter() -> None:
    out = confined("blk", """
r, w = os.pipe2(os.O_CLOEXEC)
os.write(w, b"x"); assert os.read(r, 1) == b"x"
a, b = socket.socketpair(); a.send(b"y"); assert b.recv(1) == b"y"
t = threading.Thread(target=lambda: None); t.start(); t.join()
print("ok", os.getpid() > 0)
""")
    assert out.returncode == 0 and out.stdout.strip() == "ok True", out.stderr


@pytest.mark.parametrize(("policy", "attempt"), [
    ("blk", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)"),
    ("net", "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)"),
    ("blk", "os.fork()"),
    ("net", "os.kill(os.getppid(), 0)"),
    ("blk", "os.setuid(1000)"),
])
def test_unlisted_calls_fail_with_eperm(policy: str, attempt: str) -> None:
    out = confined(policy, f"""
try:
    {attempt}
    print("allowed")
except PermissionError as exc:
    print("EPERM" if exc.errno == errno.EPERM else exc)
""")
    assert out.stdout.strip() == "EPERM", (out.stdout, out.stderr)


def test_the_display_may_listen_on_tcp() -> None:
    out = confined("display", """
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.bind(("127.0.0.1", 0)); print("ok")
""")
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("attempt", ['os.execv("/bin/true", ["true"])',
                                     "ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0)",
                                     "ctypes.CDLL(None).unshare(0x20000)"])
def test_kill_list_calls_end_only_that_process(attempt: str) -> None:
    out = confined("blk", f"""
import ctypes
threading.Thread(target=lambda: None).start()
{attempt}
print("survived")
""")
    assert out.returncode == -signal.SIGSYS, (out.returncode, out.stdout, out.stderr)
    assert "survived" not in out.stdout


def test_a_thread_started_before_the_filter_is_filtered_too() -> None:
    """TSYNC: the blk engine's workers and ZeroMQ's threads exist before confine()."""
    out = subprocess.run([sys.executable, "-c", """
import errno, socket, sys, threading
from dvmm_shared import sandbox
sandbox.drop_privileges()
go, done = threading.Event(), []
def worker():
    go.wait()
    try:
        socket.socket(socket.AF_INET)
        done.append("allowed")
    except PermissionError:
        done.append("EPERM")
t = threading.Thread(target=worker); t.start()
sandbox.confine("net")
go.set(); t.join(); print(done[0])
"""], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "EPERM", out.stderr


def test_no_seccomp_is_explicit() -> None:
    out = subprocess.run([sys.executable, "-c", """
from dvmm_shared import sandbox
sandbox.drop_privileges()
print(sandbox.confine("blk", enabled=False))
"""], capture_output=True, text=True, timeout=60, check=False)
    assert "seccomp='off'" in out.stdout and "seccomp is off (--no-seccomp)" in out.stderr
