"""Block-engine and channel faults end to end: the real blk backend process
(``--control``), the core's real vhost-user link (:class:`VhostUserLink`,
with its reconnect and replay) and a driver ring in memfd guest RAM.

Each fault is armed through the backend's command endpoint (or, for
``corrupt-msg``, the core's link) and the driver then does what a guest
would: post a request, kick, wait for the call.  The guest-visible result is
checked byte for byte; the backend's ``stats`` show the fault consumed and,
for lost notifications, the safety net's rescue.  Nothing waits on a sleep:
every wait is a poll with a deadline (a lost kick or call that is never
rescued makes ``wait_used`` time out).
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dvmm_blk.request import HEADER
from dvmm_core.core_control import CoreControl
from dvmm_core.supervisor import Supervisor
from dvmm_core.vhost_user_frontend import LinkState, VhostUserLink
from dvmm_shared.control import ControlError, command, runtime_endpoint
from dvmm_shared.driver import Buf
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, VirtioBlkReqType, bit

from .helpers import BlkProcess, EventRecorder, blk_backend, make_image
from .test_control_backend import wait_for_file
from .test_core_vhost_link import BLK_CONFIG_SIZE, HIGH, Ram, Ring, ram, sector_pattern

__all__ = ["ram"]  # the fixture, imported for pytest

SECTORS = 64
WAIT = 15.0


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


class Rig:
    """A backend with a control endpoint, the core's link to it, one ring."""

    def __init__(self, tmp_path: Path, ram: Ram, engine: str) -> None:
        self.tmp, self.ram, self.engine = tmp_path, ram, engine
        self.image = make_image(tmp_path / "disk.img", SECTORS * 512)
        self.ep = runtime_endpoint(str(tmp_path), "blk0")
        self.events = EventRecorder()
        self.ring = Ring(ram)
        self.link: VhostUserLink | None = None

    def backend(self) -> Any:
        b = blk_backend(self.tmp, self.image, "--control", self.ep, "--engine", self.engine)
        return b

    def start(self, blk: BlkProcess) -> None:
        wait_for_file(self.tmp / "blk0.ctl", blk.proc)
        self.link = VhostUserLink("blk0", str(blk.socket), self.ram.regions,
                                  config_size=BLK_CONFIG_SIZE, mem=self.ram.mem,
                                  on_event=self.events)
        self.link.connect(timeout=5.0)
        self.link.start(bit(VIRTIO_F_VERSION_1), [self.ring.start_args()])

    def fault(self, **args: Any) -> dict[str, Any]:
        return command(self.ep, "fault", **args)

    def stats(self) -> dict[str, Any]:
        return command(self.ep, "stats")

    def post_write(self, sector: int, data: bytes) -> int:
        hdr, buf, status = HIGH + 0x8000, HIGH + 0x10000, HIGH + 0xA000
        self.ram.mem.write(hdr, HEADER.pack(VirtioBlkReqType.OUT, 0, sector))
        self.ram.mem.write(buf, data)
        self.ram.mem.write(status, b"\xff")
        head = self.ring.queue.add([Buf(hdr, 16), Buf(buf, len(data)),
                                    Buf(status, 1, write=True)])
        self.ring.kick.signal()
        return head

    def write(self, sector: int, data: bytes) -> None:
        head = self.post_write(sector, data)
        assert self.ring.wait_used(WAIT) == [(head, 1)]
        assert self.ram.mem.read(HIGH + 0xA000, 1) == b"\0"

    def post_read(self, sector: int, count: int) -> int:
        hdr, buf, status = HIGH + 0x8000, HIGH + 0x10000, HIGH + 0xA000
        self.ram.mem.write(hdr, HEADER.pack(VirtioBlkReqType.IN, 0, sector))
        self.ram.mem.write(status, b"\xff")
        head = self.ring.queue.add([Buf(hdr, 16), Buf(buf, count * 512, write=True),
                                    Buf(status, 1, write=True)])
        self.ring.kick.signal()
        return head

    def read(self, sector: int, count: int) -> bytes:
        head = self.post_read(sector, count)
        assert self.ring.wait_used(WAIT) == [(head, count * 512 + 1)]
        assert self.ram.mem.read(HIGH + 0xA000, 1) == b"\0"
        return self.ram.mem.read(HIGH + 0x10000, count * 512)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.ring.close()


@pytest.fixture(params=["threads", "io_uring", "sync"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, ram: Ram) -> Iterator[Rig]:
    if request.param == "io_uring":
        from dvmm_blk.uring import probe
        if not probe():
            pytest.skip("io_uring_setup is refused on this machine")
    r = Rig(tmp_path, ram, request.param)
    yield r
    r.close()


def test_short_reads_and_writes_are_finished_and_the_guest_sees_nothing(rig: Rig) -> None:
    with rig.backend() as blk:
        rig.start(blk)
        data = pattern(8 * 512, 1)
        assert rig.fault(kind="short-write", count=2)["count"] == 2
        rig.write(10, data)
        assert rig.stats()["faults"]["device"] is None  # consumed
        assert rig.fault(kind="short-read", count=3)["count"] == 3
        assert rig.read(10, 8) == data
        assert rig.read(2, 1) == sector_pattern(2)
        faults = rig.stats()["faults"]
        assert faults["device"] is None, faults
        dev = rig.stats()["device"]
        assert dev["errors"] == 0
    assert rig.image.read_bytes()[10 * 512:18 * 512] == data
    assert "Traceback" not in blk.stderr()


def test_a_torn_write_is_replayed_in_full_after_the_crash(rig: Rig) -> None:
    data = pattern(6 * 512, 7)
    with rig.backend() as blk:
        rig.start(blk)
        assert rig.fault(kind="torn-write", percent=40)["percent"] == 40
        head = rig.post_write(20, data)
        assert blk.proc.wait(WAIT) == -signal.SIGKILL
        assert "fault injection: crashing after a torn write" in blk.stderr()
    torn = rig.image.read_bytes()[20 * 512:26 * 512]
    keep = len(data) * 40 // 100
    assert torn[:keep] == data[:keep] and torn != data  # really torn
    assert rig.link is not None
    rig.events.wait_for("device-lost")
    with rig.backend() as blk2:  # the supervisor's restart
        restored = rig.events.wait_for("device-restored")
        assert restored["replayed"] == 1
        assert rig.ring.wait_used(WAIT) == [(head, 1)]
        assert rig.ram.mem.read(HIGH + 0xA000, 1) == b"\0"
        assert rig.read(20, 6) == data
        assert rig.stats()["queues"][0]["resubmitted"] == 1
    assert rig.image.read_bytes()[20 * 512:26 * 512] == data
    assert "Traceback" not in blk2.stderr()


@pytest.mark.parametrize(("kind", "args"), [
    ("drop-kick", {"count": 1}), ("delay-kick", {"ms": 300}),
    ("drop-call", {"count": 1}), ("delay-call", {"ms": 300}),
])
def test_lost_and_late_notifications_are_recovered(tmp_path: Path, ram: Ram, kind: str,
                                                   args: dict[str, int]) -> None:
    r = Rig(tmp_path, ram, "threads")
    try:
        with r.backend() as blk:
            r.start(blk)  # returns once the ring's first (empty) pass is over
            # Armed before the first request: no pass of the device is running
            # that could find the request without its kick.
            r.fault(kind=kind, **args)
            # A driver that sleeps until the call (Linux virtio-blk): a kick or
            # a call that is never rescued leaves it waiting.
            head = r.post_read(3, 2)
            assert select.select([r.ring.call.fd], [], [], WAIT)[0], "no call came"
            r.ring.call.consume()
            assert r.ring.queue.get_used() == [(head, 2 * 512 + 1)]
            assert r.ram.mem.read(HIGH + 0x10000, 1024) == sector_pattern(3) + sector_pattern(4)
            channel = r.stats()["faults"]["channel"]
            assert channel["drop_kicks"] == channel["drop_calls"] == 0
            assert channel["kick_delay_ms"] == channel["call_delay_ms"] == 0
            what = "kicks" if "kick" in kind else "calls"
            if kind.startswith("drop"):
                assert channel["dropped"][what] == 1
                assert channel["rescued"][what] >= 1, (channel, r.stats()["queues"])
            assert r.read(5, 1) == sector_pattern(5)
        text = blk.stderr()
        assert f"fault injection: {what[:-1]} of queue 0" in text
        assert "Traceback" not in text
    finally:
        r.close()


def test_a_corrupted_message_drops_the_session_and_the_link_recovers(tmp_path: Path,
                                                                     ram: Ram) -> None:
    r = Rig(tmp_path, ram, "threads")
    try:
        with r.backend() as blk:
            r.start(blk)
            assert r.link is not None
            assert r.read(1, 1) == sector_pattern(1)
            for n, mode in enumerate(("version", "size"), start=1):
                assert r.link.corrupt_message(mode) is True
                r.events.wait_for("device-lost", count=n)
                r.events.wait_for("device-restored", count=n)
                assert r.link.state is LinkState.CONNECTED
                assert r.read(6, 1) == sector_pattern(6)
            stats = r.stats()
            assert stats["protocol_errors"] == 2 and stats["connections"] == 3
            with pytest.raises(ValueError, match="mode must be one of"):
                r.link.corrupt_message("nonsense")
        text = blk.stderr()
        assert "dropping the frontend: unsupported vhost-user version" in text
        assert "dropping the frontend: payload of 4097 bytes" in text
        assert os.path.exists(r.image) and "Traceback" not in text
    finally:
        r.close()


def test_corrupt_msg_through_the_cores_control_endpoint(tmp_path: Path, ram: Ram) -> None:
    """``core.ctl fault name=blk0 action=corrupt-msg``, as ``dvmm chaos`` sends it."""
    r = Rig(tmp_path, ram, "threads")
    core_dir = tmp_path / "core"
    core_dir.mkdir()
    try:
        with r.backend() as blk:
            r.start(blk)
            link = r.link
            assert link is not None
            control = CoreControl(Supervisor(runtime_dir=str(core_dir)), lambda: [link],
                                  lambda: "running")
            control.start()
            ep = runtime_endpoint(str(core_dir), "core")
            try:
                reply = command(ep, "fault", name="blk0", action="corrupt-msg", mode="size")
                assert reply == {"ok": True, "name": "blk0", "action": "corrupt-msg",
                                 "mode": "size"}
                r.events.wait_for("device-restored")
                assert r.read(9, 1) == sector_pattern(9)
                for args, text in (({"name": "blk9"}, "no vhost-user link called 'blk9'"),
                                   ({"name": "blk0", "mode": 3}, "mode must be one of")):
                    with pytest.raises(ControlError, match=text):
                        command(ep, "fault", action="corrupt-msg", **args)
                assert [e["event"] for e in control.history()] == ["fault-injected"]
            finally:
                control.close()
        assert "dropping the frontend: payload of 4097 bytes" in blk.stderr()
    finally:
        r.close()
