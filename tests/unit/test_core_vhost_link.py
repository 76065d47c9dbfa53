"""The core's vhost-user link against the real blk backend (``python -m dvmm_blk``).

Guest RAM is two memfds at guest-physical 0 and 4 GiB, described to the link
as :class:`RamRegion` s the way the machine does; rings and buffers are laid
out in it with the driver-side :class:`DriverQueue` and the link translates
the guest-physical ring addresses.  A backend that goes away is *lost* (nothing
reaches the guest) until one listens on the socket again; a backend that
cannot be reached at start-up is :class:`LinkDown`, never a bare OSError.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvmm_blk.request import HEADER
from dvmm_core.vhost_user_frontend import (
    LinkDown,
    LinkState,
    QueueStart,
    RamRegion,
    VhostUserLink,
)
from dvmm_shared.driver import Buf, DriverQueue, ring_layout
from dvmm_shared.eventfd import EventFd
from dvmm_shared.memory import GuestMemory, memfd_region
from dvmm_shared.vhost_user.message import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, VirtioBlkReqType, bit

from .helpers import BlkProcess, EventRecorder, blk_backend, make_image

SECTORS = 64
LOW, HIGH, REGION_SIZE = 0x0, 0x1_0000_0000, 1 << 20
BLK_CONFIG_SIZE = 60
QSIZE = 16


@dataclass
class Ram:
    mem: GuestMemory
    regions: list[RamRegion]
    fds: list[int]


@pytest.fixture
def ram() -> Iterator[Ram]:
    mem, regions, fds = GuestMemory(), [], []
    for gpa in (LOW, HIGH):
        fd, region = memfd_region(REGION_SIZE, guest_addr=gpa)
        mem.add(region)
        fds.append(fd)
        regions.append(RamRegion(gpa, REGION_SIZE, region.user_addr, fd, 0))
    yield Ram(mem, regions, fds)
    for fd in fds:
        os.close(fd)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BlkProcess]:
    image = make_image(tmp_path / "disk.img", SECTORS * 512)
    with blk_backend(tmp_path, image) as blk:
        yield blk


@pytest.fixture
def link(backend: BlkProcess, ram: Ram) -> Iterator[VhostUserLink]:
    lk = VhostUserLink("blk0", str(backend.socket), ram.regions, config_size=BLK_CONFIG_SIZE)
    lk.connect(timeout=5.0)
    yield lk
    lk.close()


class Ring:
    """One driver ring in the high RAM region, with its kick and call eventfds."""

    def __init__(self, ram: Ram, base: int = HIGH + 0x1000) -> None:
        self.ram = ram
        self.layout = ring_layout(base, QSIZE)
        self.queue = DriverQueue(ram.mem, self.layout)
        self.kick, self.call = EventFd(), EventFd()

    def start_args(self) -> QueueStart:
        lay = self.layout
        return QueueStart(0, QSIZE, lay.desc_addr, lay.avail_addr, lay.used_addr,
                          self.kick.fd, self.call.fd)

    def read_sector(self, sector: int) -> tuple[bytes, int]:
        """Post a VIRTIO_BLK_T_IN for one sector, kick, wait; (data, status)."""
        hdr, data, status = HIGH + 0x8000, HIGH + 0x9000, HIGH + 0xA000
        self.ram.mem.write(hdr, HEADER.pack(VirtioBlkReqType.IN, 0, sector))
        self.ram.mem.write(status, b"\xff")
        head = self.queue.add([Buf(hdr, 16), Buf(data, 512, write=True),
                               Buf(status, 1, write=True)])
        if self.queue.should_kick():
            self.kick.signal()
        used = self.wait_used()
        assert used == [(head, 513)]
        return self.ram.mem.read(data, 512), self.ram.mem.read(status, 1)[0]

    def wait_used(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        used = self.queue.get_used()
        while not used:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.call.fd], [], [], left)[0]:
                raise TimeoutError("no completion from the backend")
            self.call.consume()
            used = self.queue.get_used()
        return used

    def close(self) -> None:
        self.kick.close()
        self.call.close()


def sector_pattern(sector: int) -> bytes:
    return sector.to_bytes(8, "little") + bytes([sector & 0xFF]) * 504


# -- against a live backend -----------------------------------------------------------
def test_connect_negotiates(link: VhostUserLink) -> None:
    assert link.fe is not None
    assert link.num_queues == 1
    assert link.device_features & bit(VIRTIO_F_VERSION_1)
    assert not link.device_features & 1 << VHOST_USER_F_PROTOCOL_FEATURES
    assert link.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES
    for feature in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG):
        assert link.protocol & 1 << feature


def test_config_returns_the_capacity(link: VhostUserLink) -> None:
    assert int.from_bytes(link.get_config(0, 8), "little") == SECTORS
    assert int.from_bytes(link.get_config(20, 4), "little") == 512  # blk_size
    assert link.get_config(4, 4) == bytes(4)  # high half of the capacity
    # Past the config structure: zeros, without asking the backend.
    assert link.get_config(BLK_CONFIG_SIZE - 2, 4) == bytes(4)


def test_set_config_is_accepted(link: VhostUserLink) -> None:
    link.set_config(32, b"\x01")  # writeback: the backend ignores it
    assert int.from_bytes(link.get_config(0, 8), "little") == SECTORS


def test_a_request_end_to_end(link: VhostUserLink, ram: Ram) -> None:
    ring = Ring(ram)
    try:
        link.start(bit(VIRTIO_F_VERSION_1), [ring.start_args()])
        for sector in (5, 0, SECTORS - 1):
            data, status = ring.read_sector(sector)
            assert status == 0
            assert data == sector_pattern(sector)
    finally:
        ring.close()


def test_stop_then_restart_with_fresh_rings(link: VhostUserLink, ram: Ram) -> None:
    first = Ring(ram)
    second = Ring(ram, base=LOW + 0x10000)  # this time in the low region
    try:
        link.start(bit(VIRTIO_F_VERSION_1), [first.start_args()])
        assert first.read_sector(3)[1] == 0
        link.stop()
        link.stop()  # nothing started: no traffic, no error
        link.start(bit(VIRTIO_F_VERSION_1), [second.start_args()])
        data, status = second.read_sector(7)
        assert (data, status) == (sector_pattern(7), 0)
        link.stop()
    finally:
        first.close()
        second.close()


def test_a_ring_outside_guest_ram_is_link_down(link: VhostUserLink) -> None:
    bad = QueueStart(0, QSIZE, 0x8000_0000, 0x8000_1000, 0x8000_2000, -1, -1)
    with pytest.raises(LinkDown, match="not in guest RAM"):
        link.start(bit(VIRTIO_F_VERSION_1), [bad])


def recovering_link(backend: BlkProcess, ram: Ram) -> tuple[VhostUserLink, EventRecorder]:
    rec = EventRecorder()
    lk = VhostUserLink("blk0", str(backend.socket), ram.regions, config_size=BLK_CONFIG_SIZE,
                       mem=ram.mem, on_event=rec)
    lk.connect(timeout=5.0)
    return lk, rec


def test_a_killed_backend_is_lost_and_nothing_reaches_the_guest(backend: BlkProcess,
                                                                ram: Ram) -> None:
    lk, rec = recovering_link(backend, ram)
    ring = Ring(ram)
    try:
        assert int.from_bytes(lk.get_config(0, 8), "little") == SECTORS
        lk.start(bit(VIRTIO_F_VERSION_1), [ring.start_args()])
        backend.proc.kill()
        backend.proc.wait(10)
        assert rec.wait_for("device-lost")["name"] == "blk0"
        assert lk.state is LinkState.LOST
        # The guest keeps its config space, its writes are dropped, resets work.
        assert int.from_bytes(lk.get_config(0, 8), "little") == SECTORS
        lk.set_config(32, b"\x01")
        lk.stop()
        lk.start(bit(VIRTIO_F_VERSION_1), [ring.start_args()])  # remembered for later
    finally:
        lk.close()
        ring.close()


def test_a_restarted_backend_gets_the_setup_replayed_and_serves_the_waiting_request(
        tmp_path: Path, backend: BlkProcess, ram: Ram) -> None:
    lk, rec = recovering_link(backend, ram)
    ring = Ring(ram)
    try:
        lk.start(bit(VIRTIO_F_VERSION_1), [ring.start_args()])
        assert ring.read_sector(3) == (sector_pattern(3), 0)
        backend.proc.kill()
        backend.proc.wait(10)
        rec.wait_for("device-lost")
        # A request posted while the backend is away: the kick waits in the eventfd.
        hdr, data, status = HIGH + 0x8000, HIGH + 0x9000, HIGH + 0xA000
        ram.mem.write(hdr, HEADER.pack(VirtioBlkReqType.IN, 0, 5))
        head = ring.queue.add([Buf(hdr, 16), Buf(data, 512, write=True),
                               Buf(status, 1, write=True)])
        ring.kick.signal()
        with blk_backend(tmp_path, backend.socket.parent / "disk.img"):
            restored = rec.wait_for("device-restored")
            assert ring.wait_used(timeout=15) == [(head, 513)]
            assert ram.mem.read(data, 512) == sector_pattern(5)
            assert ram.mem.read(status, 1) == b"\0"
            assert lk.state is LinkState.CONNECTED and lk.restores == 1
            assert float(str(restored["outage_ms"])) > 0
            assert ring.read_sector(7) == (sector_pattern(7), 0)
    finally:
        lk.close()
        ring.close()


# -- nobody there -------------------------------------------------------------------------
def test_nobody_listening_is_link_down_at_once(tmp_path: Path, ram: Ram) -> None:
    lk = VhostUserLink("blk0", str(tmp_path / "nobody.sock"), ram.regions)
    t0 = time.monotonic()
    with pytest.raises(LinkDown, match="nobody listens"):
        lk.connect(timeout=0)
    assert time.monotonic() - t0 < 1.0


def test_a_stale_socket_file_is_link_down(tmp_path: Path, ram: Ram) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    lk = VhostUserLink("blk0", str(path), ram.regions)
    with pytest.raises(LinkDown):
        lk.connect(timeout=0)


def test_calls_before_connect_are_link_down(tmp_path: Path, ram: Ram) -> None:
    lk = VhostUserLink("blk0", str(tmp_path / "x.sock"), ram.regions, config_size=60)
    with pytest.raises(LinkDown, match="not connected"):
        lk.start(bit(VIRTIO_F_VERSION_1), [])
    lk.stop()  # nothing started: nothing to do
    assert lk.get_config(0, 8) == bytes(8)  # no CONFIG protocol feature negotiated


def test_connect_waits_for_a_backend_that_is_starting(tmp_path: Path, ram: Ram) -> None:
    image = make_image(tmp_path / "disk.img", SECTORS * 512)
    # Start connecting before the backend exists; connect() polls for the socket.
    lk = VhostUserLink("blk0", str(tmp_path / "blk.sock"), ram.regions, config_size=60)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            lk.connect(timeout=15.0)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=connect)
    th.start()
    try:
        with blk_backend(tmp_path, image):
            th.join(20)
            assert not th.is_alive() and errors == []
            assert int.from_bytes(lk.get_config(0, 8), "little") == SECTORS
    finally:
        th.join(20)
        lk.close()
