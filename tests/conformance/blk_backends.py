"""vhost-user-blk backends for the conformance tier: dvmm's and a known-good peer.

Each backend is a real process listening on a Unix socket; the tests run the
same checks against both, so a failure that happens only with dvmm's is
dvmm's, and one that happens with both is the harness's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dvmm_testing import procs

BACKENDS = ("dvmm", "qsd")
DVMM_SERIAL = "dvmm-conformance-01"
# qemu-storage-daemon's vhost-user-blk export answers GET_ID with a fixed id.
QSD_SERIAL = "vhost_user_blk"


@dataclass(frozen=True)
class Backend:
    kind: str
    socket: str
    serial: str
    proc: subprocess.Popen[bytes]

    def qemu_args(self, queues: int = 1) -> list[str]:
        return ["-chardev", f"socket,id=blk0,path={self.socket}",
                "-device", f"vhost-user-blk-pci,chardev=blk0,num-queues={queues}"]


def _argv(kind: str, image: Path, sock: str, read_only: bool, queues: int) -> list[str]:
    if kind == "dvmm":
        argv = [sys.executable, "-m", "dvmm_blk", "--socket", sock, "--image", str(image),
                "--queues", str(queues), "--serial", DVMM_SERIAL]
        return [*argv, "--read-only"] if read_only else argv
    writable = "off" if read_only else "on"
    return ["qemu-storage-daemon", "--blockdev",
            f"driver=file,node-name=f0,filename={image},discard=unmap"
            + (",read-only=on" if read_only else ""),
            "--export", f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={sock},"
            f"node-name=f0,writable={writable},num-queues={queues}"]


@contextmanager
def blk_backend(kind: str, image: Path, workdir: Path, *, read_only: bool = False,
                queues: int = 1) -> Iterator[Backend]:
    sock = str(workdir / f"{kind}-blk.sock")
    log = workdir / f"{kind}-blk.log"
    proc = procs.spawn(_argv(kind, image, sock, read_only, queues), log)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} backend did not listen:\n{procs.log_tail(log)}")
            time.sleep(0.02)
        yield Backend(kind, sock, DVMM_SERIAL if kind == "dvmm" else QSD_SERIAL, proc)
    finally:
        procs.stop(proc)
