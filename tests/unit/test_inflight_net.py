"""In-flight tracking in the net device's own ring loops (not the daemon's).

A real daemon serves :class:`NetDevice` on a fake link; the frontend keeps
guest memory, rings and the in-flight region across connections.  Between
two connections the test leaves the rings and region as a net backend that
died mid-round would have: a transmit chain taken but not returned while a
later one was, a receive chain taken and not filled.  After the reconnect
the transmit chain is sent again (once) and the later one is not; the
receive chain is filled by the next frame, after being given back once for
want of a frame, and returned exactly once.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dvmm_net.device import NetDevice
from dvmm_net.header import HDR_LEN, VirtioNetHdr
from dvmm_shared.driver import DriverQueue
from dvmm_shared.inflight import queue_region_size
from dvmm_shared.synthetic import DriverRing

from .helpers import DaemonThread
from .inflight_rig import InflightVM
from .test_net_device import (
    MAC,
    MRG,
    QSIZE,
    RX,
    TX,
    FakeLink,
    frame,
    post_rx,
    post_tx,
    used,
    wait_for,
)


@dataclass
class NetRig:
    link: FakeLink
    daemon: DaemonThread
    vm: InflightVM

    def reconnect(self) -> None:
        self.vm.connect(self.daemon.path, MRG, num_queues=2, queue_size=QSIZE)


@contextmanager
def net_rig(tmp_path: Path) -> Iterator[NetRig]:
    link = FakeLink()
    device = NetDevice(link, mac=MAC)
    vm = InflightVM(mem_size=8 << 20)
    try:
        with DaemonThread(device, tmp_path / "net.sock") as daemon:
            rig = NetRig(link, daemon, vm)
            rig.reconnect()
            yield rig
    finally:
        vm.close()


class Region:
    """The test's view of one queue's in-flight region (vhost-user.rst layout)."""

    def __init__(self, vm: InflightVM, index: int) -> None:
        assert vm.inflight is not None
        fd, info = vm.inflight
        self._map = mmap.mmap(fd, info.mmap_size)
        self.base = index * queue_region_size(QSIZE)

    def header(self) -> tuple[int, int, int, int]:
        version, desc_num, last, used_idx = struct.unpack_from("<HHHH", self._map, self.base + 8)
        return version, desc_num, last, used_idx

    def set_header(self, last_batch_head: int, used_idx: int) -> None:
        struct.pack_into("<HH", self._map, self.base + 12, last_batch_head, used_idx)

    def mark(self, head: int, counter: int) -> None:
        off = self.base + 16 + 16 * head
        struct.pack_into("<B5xHQ", self._map, off, 1, 0, counter)

    def inflight(self) -> list[int]:
        return [i for i in range(QSIZE) if self._map[self.base + 16 + 16 * i]]

    def close(self) -> None:
        self._map.close()


def complete_as_the_dead_backend_did(driver: DriverQueue, head: int) -> None:
    """Write a used element and publish it, as the previous process had."""
    lay, idx = driver.layout, driver.used_idx()
    driver.mem.write(lay.used_addr + 4 + 8 * (idx % driver.size), struct.pack("<II", head, 0))
    driver.mem.write(lay.used_addr + 2, struct.pack("<H", (idx + 1) & 0xFFFF))


def disconnect(rig: NetRig) -> None:
    """Close the frontend and wait until the daemon has let the rings go
    (until then it may still serve what the driver posts)."""
    assert rig.vm.frontend is not None
    rig.vm.frontend.close()
    rig.vm.frontend = None
    wait_for(lambda: rig.daemon.daemon.session is None, "the daemon to drop the session")


def test_a_transmit_chain_left_in_flight_is_sent_again_once(tmp_path: Path) -> None:
    with net_rig(tmp_path) as rig:
        tx: DriverRing = rig.vm.rings[TX]
        first = VirtioNetHdr().pack() + frame(80, 1)
        head = post_tx(rig.vm, tx, first)
        assert used(tx, 1) == [(head, 0)]
        assert rig.link.take() == first
        disconnect(rig)
        # The dead backend took h then j, sent and returned j, and died with h.
        h_data, j_data = VirtioNetHdr().pack() + frame(90, 2), VirtioNetHdr().pack() + frame(70, 3)
        h = post_tx(rig.vm, tx, h_data, kick=False)
        j = post_tx(rig.vm, tx, j_data, kick=False)
        region = Region(rig.vm, TX)
        try:
            assert region.header()[:2] == (1, QSIZE)
            complete_as_the_dead_backend_did(tx.queue, j)
            region.mark(h, counter=41)
            region.set_header(last_batch_head=j, used_idx=tx.queue.used_idx())
            rig.reconnect()
            assert used(tx, 2) == [(j, 0), (h, 0)]
            assert rig.link.take() == h_data
            assert rig.link.pending_frames() == []  # j is not sent twice
            assert region.inflight() == []
            assert rig.daemon.daemon.stats.queue(TX).resubmitted == 1
        finally:
            region.close()
        nxt = VirtioNetHdr().pack() + frame(60, 4)
        head = post_tx(rig.vm, tx, nxt)
        assert used(tx, 1) == [(head, 0)]
        assert rig.link.take() == nxt


def test_a_receive_chain_left_in_flight_is_filled_once(tmp_path: Path) -> None:
    with net_rig(tmp_path) as rig:
        rx: DriverRing = rig.vm.rings[RX]
        disconnect(rig)
        heads = list(post_rx(rig.vm, rx, 2048, 2048, kick=False))
        region = Region(rig.vm, RX)
        try:
            region.mark(heads[0], counter=7)  # taken by the dead backend, not filled
            rig.reconnect()  # nothing to receive yet: the chain is given back, still marked
            assert region.inflight() == [heads[0]]
            assert rig.daemon.daemon.stats.queue(RX).resubmitted == 1
            rig.link.inject(bytes(HDR_LEN) + frame(100, 5))
            (head, length), = used(rx, 1)
            assert (head, length) == (heads[0], HDR_LEN + 100)
            rig.link.inject(bytes(HDR_LEN) + frame(50, 6))
            assert used(rx, 1) == [(heads[1], HDR_LEN + 50)]
            assert region.inflight() == []
            assert region.header()[3] == rx.queue.used_idx()
        finally:
            region.close()
