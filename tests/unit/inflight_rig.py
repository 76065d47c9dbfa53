"""A frontend that keeps what a VMM keeps across backend restarts.

Guest memory, the driver rings, the kick/call eventfds and the in-flight
region (GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every connection, before
the rings start) survive; each :meth:`InflightVM.connect` brings a (new)
backend up on them, giving each ring the used index as its base, which is
all a frontend knows after a backend crash.  Also: a blk-like backend
program run as a child process, to be killed by its own crash point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dvmm_shared.driver import DriverQueue, ring_bytes, ring_layout
from dvmm_shared.eventfd import EventFd
from dvmm_shared.synthetic import DEFAULT_PROTOCOL, DriverRing, SyntheticVM
from dvmm_shared.vhost_user.frontend import Frontend, RingSetup
from dvmm_shared.vhost_user.message import InflightInfo, MemRegion, ProtocolFeature
from dvmm_shared.virtio import VIRTIO_F_RING_EVENT_IDX

from .helpers import wait_for_socket

INFLIGHT_PROTOCOL = DEFAULT_PROTOCOL | 1 << ProtocolFeature.INFLIGHT_SHMFD


class InflightVM(SyntheticVM):
    """A :class:`SyntheticVM` whose rings and in-flight region outlive connections."""

    inflight: tuple[int, InflightInfo] | None = None

    def connect(self, socket_path: str, features: int, num_queues: int = 1,
                queue_size: int = 128, event_idx: bool | None = None,
                protocol: int = INFLIGHT_PROTOCOL) -> int:
        assert self.region is not None
        if self.frontend is not None:
            self.frontend.close()
        fe = self.frontend = Frontend.connect(socket_path)
        acked, _ = fe.negotiate(features, protocol)
        fe.set_mem_table([MemRegion(0, self.mem_size, self.region.user_addr, 0)], [self.fd])
        if self.inflight is None:
            self.inflight = fe.get_inflight_fd(num_queues, queue_size)
        fe.set_inflight_fd(*self.inflight)
        u = self.region.user_addr
        for i in range(num_queues):
            if i == len(self.rings):
                layout = ring_layout(self.alloc(ring_bytes(queue_size)), queue_size)
                driver = DriverQueue(self.mem, layout,
                                     event_idx=bool(acked & 1 << VIRTIO_F_RING_EVENT_IDX))
                self.rings.append(DriverRing(i, driver, EventFd(), EventFd()))
            ring = self.rings[i]
            lay = ring.queue.layout
            fe.start_ring(RingSetup(i, queue_size, u + lay.desc_addr, u + lay.avail_addr,
                                    u + lay.used_addr, ring.kick.fd, ring.call.fd,
                                    base=ring.queue.used_idx()))
        return acked

    def close(self) -> None:
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None
        super().close()


# A backend program: the echo device of the unit tests behind a real daemon,
# with an optional crash point (argv: socket, crash point or "-").
ECHO_PROGRAM = """
import logging, sys
from tests.unit.helpers import EchoBackend
from dvmm_shared.vhost_user.daemon import Daemon
logging.basicConfig(level=logging.INFO)
daemon = Daemon(EchoBackend(queues=1), sys.argv[1])
daemon.crash_point = None if sys.argv[2] == "-" else sys.argv[2]
daemon.install_signal_handlers()
daemon.serve_forever()
"""
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def echo_backend(sock: Path, crash_point: str | None, log: Path
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """The echo backend in a child process; terminated (SIGTERM) on exit."""
    sock.unlink(missing_ok=True)  # a killed predecessor's
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_PROGRAM, str(sock), crash_point or "-"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)
