"""In-process hardening and fd hand-off (issue 12), on real processes.

Each hardening test runs in a fresh interpreter (the steps are
irreversible and per thread), which prints what it observed as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dvmm_shared.sandbox_fds import FdOffer, FdPassingError, receive_fds


def opened(fd: int) -> int:
    """How many of this process's fds refer to the same file as ``fd``."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            pass  # the listing's own directory fd
    return count


def child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_drop_privileges_leaves_no_capability_and_no_new_privs() -> None:
    out = child("""
import json
from dvmm_shared import sandbox
before = sandbox.proc_status_field("CapEff")
sandbox.drop_privileges()
print(json.dumps({"before": before, "eff": sandbox.proc_status_field("CapEff"),
                  "prm": sandbox.proc_status_field("CapPrm"),
                  "bnd": sandbox.proc_status_field("CapBnd"),
                  "nnp": sandbox.proc_status_field("NoNewPrivs")}))
""")
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["eff"] == seen["prm"] == 0 and seen["nnp"] == 1
    if seen["before"]:  # started with capabilities (root): the bounding set is empty too
        assert seen["bnd"] == 0


def test_drop_privileges_refuses_once_a_thread_runs() -> None:
    out = child("""
import threading, time
from dvmm_shared import sandbox
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
try:
    sandbox.drop_privileges()
except sandbox.SandboxError as exc:
    print("refused:", exc)
""")
    assert "refused: capabilities must be dropped before any thread starts" in out.stdout


def test_fds_travel_with_their_names_and_the_lifeline_closes(tmp_path: Path) -> None:
    path = str(tmp_path / "fds.sock")
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    offer = FdOffer(path, {"image-fd": [r1], "tap-fd": [r2, w2]})
    try:
        fds, lifeline = receive_fds(path)
        assert list(fds) == ["image-fd", "tap-fd"] and len(fds["tap-fd"]) == 2
        os.write(w1, b"hello")
        assert os.read(fds["image-fd"][0], 5) == b"hello"  # the same pipe
        assert not os.get_inheritable(fds["image-fd"][0])
        again, lifeline2 = receive_fds(path)  # a restarted backend gets them again
        assert len(again["tap-fd"]) == 2
        lifeline2.close()
    finally:
        offer.close()
    lifeline.settimeout(5)
    assert lifeline.recv(1) == b""  # the supervisor went away: the backend stops
    for fd in (r1, w1, r2, w2, *fds["image-fd"], *fds["tap-fd"], *again["image-fd"],
               *again["tap-fd"]):
        os.close(fd)


@pytest.mark.parametrize("header", [b"not json", b'{"image-fd": 2}', b'{"shell": 1}',
                                    b'{"image-fd": true}', b"[1]"])
def test_a_hostile_fd_header_is_refused_and_its_fds_closed(tmp_path: Path,
                                                           header: bytes) -> None:
    path = str(tmp_path / "evil.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    r, w = os.pipe()

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 r.to_bytes(4, sys.byteorder))])
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    before = opened(r)  # both ends of the pipe
    with pytest.raises(FdPassingError):
        receive_fds(path, timeout=5)
    t.join()
    assert opened(r) == before  # the received copy of the pipe did not leak
    for fd in (r, w):
        os.close(fd)
    srv.close()


def test_fds_from_nobody_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_blk", "--socket", str(tmp_path / "s"),
                          "--fds-from", str(tmp_path / "none.sock")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("dvmm backend blk: error: cannot receive fds from")
    assert len(out.stderr.strip().splitlines()) == 1
