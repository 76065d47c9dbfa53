"""The net device end to end in-process: a SyntheticVM drives a real daemon
serving :class:`NetDevice`, whose link is a socketpair standing in for the TAP.

Covers transmit and receive (one chain per frame, mergeable buffers
spanning chains), back-pressure in both directions, hostile chains (counted
and survived), the control queue, and two devices joined by a peer link.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvmm_net.device import NetDevice
from dvmm_net.header import HDR_LEN, MAX_GSO_FRAME, VirtioNetHdr
from dvmm_net.link import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from dvmm_net.pair import READ
from dvmm_net.peer import PeerLink, PeerState
from dvmm_shared.driver import Buf
from dvmm_shared.synthetic import DriverRing, SyntheticVM
from dvmm_shared.vhost_user.message import MemRegion
from dvmm_shared.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_S_LINK_UP,
    bit,
)

from .helpers import DaemonThread

MAC = bytes.fromhex("525400abcdef")
ALL = (1 << 64) - 1
BASE = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VIRTIO_F_RING_INDIRECT_DESC)
MRG = BASE | bit(VIRTIO_NET_F_MRG_RXBUF)
QSIZE = 64
RX, TX = 0, 1


class FakeLink:
    """A SOCK_SEQPACKET socketpair per queue pair standing in for a TAP.

    The device owns one end of each; the test writes and reads whole frames
    (with the 12-byte header when ``vnet_hdr``) at the other."""

    def __init__(self, pairs: int = 1, vnet_hdr: bool = True, sndbuf: int | None = None) -> None:
        self.ends = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                     for _ in range(pairs)]
        for dev, _ in self.ends:
            dev.setblocking(False)
            if sndbuf is not None:
                dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self._vnet_hdr = vnet_hdr
        self.configured: list[tuple[int, int]] = []
        self.active: dict[int, bool] = {}

    @property
    def vnet_hdr(self) -> bool:
        return self._vnet_hdr

    @property
    def pairs(self) -> int:
        return len(self.ends)

    @property
    def description(self) -> str:
        return "fake link"

    def fileno(self, pair: int) -> int:
        return self.ends[pair][0].fileno()

    def recv(self, pair: int, bufs: Sequence[memoryview]) -> int:
        # like a TAP read: a frame longer than the buffers fills them exactly
        n, _, _, _ = self.ends[pair][0].recvmsg_into(bufs)
        return int(n)

    def send(self, pair: int, bufs: Sequence[memoryview]) -> None:
        self.ends[pair][0].sendmsg(bufs)

    def reopen(self, pair: int) -> None:
        pass

    def set_vnet_header(self, size: int, offloads: int) -> None:
        self.configured.append((size, offloads))

    def set_pair_active(self, pair: int, active: bool) -> None:
        self.active[pair] = active

    def close(self) -> None:
        for a, b in self.ends:
            a.close()
            b.close()

    # -- the test's side ----------------------------------------------------------
    def inject(self, frame: bytes, pair: int = 0) -> None:
        self.ends[pair][1].send(frame)

    def take(self, pair: int = 0, timeout: float = 5.0) -> bytes:
        self.ends[pair][1].settimeout(timeout)
        return self.ends[pair][1].recv(1 << 17)

    def pending_frames(self, pair: int = 0) -> list[bytes]:
        out = []
        self.ends[pair][1].setblocking(False)
        try:
            while True:
                out.append(self.ends[pair][1].recv(1 << 17))
        except BlockingIOError:
            return out


@dataclass
class Rig:
    link: FakeLink
    device: NetDevice
    daemon: DaemonThread
    vm: SyntheticVM
    acked: int

    def ring(self, index: int) -> DriverRing:
        return self.vm.rings[index]


@contextmanager
def rig(tmp_path: Path, features: int = MRG, *, pairs: int = 1, vnet_hdr: bool = True,
        mtu: int | None = None, sndbuf: int | None = None, rings: int | None = None
        ) -> Iterator[Rig]:
    link = FakeLink(pairs, vnet_hdr, sndbuf)
    device = NetDevice(link, mac=MAC, mtu=mtu, queue_pairs=pairs)
    with DaemonThread(device, tmp_path / "net.sock") as daemon, \
            SyntheticVM(mem_size=8 << 20) as vm:
        acked = vm.connect(daemon.path, features, num_queues=rings or 2 * pairs,
                           queue_size=QSIZE)
        yield Rig(link, device, daemon, vm, acked)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def used(ring: DriverRing, count: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while len(out) < count:
        out += ring.wait_used()
    return out


def post_rx(vm: SyntheticVM, ring: DriverRing, *sizes: int, kick: bool = True
            ) -> dict[int, int]:
    """Post one writable buffer per size; returns head -> guest address."""
    heads = {}
    for size in sizes:
        addr = vm.alloc(size, align=16)
        vm.mem.write(addr, b"\xee" * size)
        heads[ring.queue.add([Buf(addr, size, write=True)])] = addr
    if kick:
        ring.kick_if_needed()
    return heads


def post_tx(vm: SyntheticVM, ring: DriverRing, data: bytes, pieces: int = 1,
            indirect: bool = False, kick: bool = True) -> int:
    bufs = []
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        addr = vm.alloc(len(data[i:i + step]), align=16)
        vm.mem.write(addr, data[i:i + step])
        bufs.append(Buf(addr, len(data[i:i + step])))
    table = vm.alloc(16 * len(bufs), align=16) if indirect else None
    head = ring.queue.add(bufs, indirect_at=table)
    if kick:
        ring.kick_if_needed()
    return head


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def tap_frame(data: bytes, hdr: VirtioNetHdr | None = None) -> bytes:
    """What a TAP hands over: the header (num_buffers unset) and the frame."""
    raw = bytearray((hdr or VirtioNetHdr()).pack())
    raw[10:12] = b"\xff\xff"  # the TAP skips num_buffers: garbage the device must set
    return bytes(raw) + data


def thread_cpu_ticks(native_id: int) -> int:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# -- what is offered ------------------------------------------------------------
def test_features_config_and_offloads(tmp_path: Path) -> None:
    with rig(tmp_path, ALL, mtu=9000) as r:
        acked = r.acked
        for f in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                  VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CTRL_VQ):
            assert acked & bit(f), f
        assert not acked & bit(VIRTIO_NET_F_MQ)  # one pair
        assert r.vm.frontend is not None
        mac, status, pairs, mtu = struct.unpack("<6sHHH", r.vm.frontend.get_config(0, 12))
        assert (mac, status, pairs, mtu) == (MAC, VIRTIO_NET_S_LINK_UP, 1, 9000)
        assert r.link.configured[-1] == (HDR_LEN, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    # A link of bare frames cannot carry offloads: none are offered.
    device = NetDevice(FakeLink(vnet_hdr=False), mac=MAC)
    for f in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4,
              VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MTU, VIRTIO_NET_F_MQ):
        assert not device.features() & bit(f)


def test_offloads_follow_what_the_driver_acked(tmp_path: Path) -> None:
    with rig(tmp_path, MRG | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)) as r:
        assert r.link.configured[-1] == (HDR_LEN, TUN_F_CSUM | TUN_F_TSO4)
    with rig(tmp_path, MRG | bit(VIRTIO_NET_F_GUEST_TSO4)) as r:  # TSO needs GUEST_CSUM
        assert r.link.configured[-1] == (HDR_LEN, 0)
    with rig(tmp_path, bit(VIRTIO_F_RING_EVENT_IDX)) as r:  # a legacy driver: 10-byte header
        assert r.link.configured[-1] == (10, 0)


# -- transmit -------------------------------------------------------------------
@pytest.mark.parametrize("indirect", [False, True])
def test_transmit_to_a_tap_keeps_the_header(tmp_path: Path, indirect: bool) -> None:
    features = MRG | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)
    with rig(tmp_path, features) as r:
        hdr = VirtioNetHdr(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                           gso_size=1448, csum_start=34, csum_offset=16)
        data = hdr.pack() + frame(3000)
        head = post_tx(r.vm, r.ring(TX), data, pieces=3, indirect=indirect)
        assert used(r.ring(TX), 1) == [(head, 0)]
        assert r.link.take() == data  # header and frame, one record
        st = r.device.stats().pairs[0]
        assert (st.tx_frames, st.tx_bytes, st.tx_gso, st.tx_csum) == (1, 3000, 1, 1)


def test_transmit_to_a_bare_link_strips_the_header(tmp_path: Path) -> None:
    with rig(tmp_path, vnet_hdr=False) as r:
        heads = [post_tx(r.vm, r.ring(TX), VirtioNetHdr().pack() + frame(60 + i, i))
                 for i in range(5)]
        assert sorted(h for h, _ in used(r.ring(TX), 5)) == sorted(heads)
        assert [r.link.take() for _ in range(5)] == [frame(60 + i, i) for i in range(5)]


def test_transmit_back_pressure_waits_for_the_link(tmp_path: Path) -> None:
    with rig(tmp_path, sndbuf=4096) as r:
        frames = [VirtioNetHdr().pack() + frame(1000, i) for i in range(20)]
        for f in frames:
            post_tx(r.vm, r.ring(TX), f, kick=False)
        r.ring(TX).kick.signal()
        pair = r.device.pairs[0]
        wait_for(lambda: pair.tx_blocked, "transmission to block on the full link")
        done = r.ring(TX).queue.get_used()
        assert len(done) < 20
        assert [r.link.take() for _ in range(20)] == frames  # draining lets the rest through
        done += used(r.ring(TX), 20 - len(done))
        assert len(done) == 20
        assert r.device.stats().tx_blocked >= 1
        assert not pair.tx_blocked


def test_hostile_transmit_chains_are_counted_and_survived(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        vm, ring = r.vm, r.ring(TX)
        good = VirtioNetHdr().pack() + frame(80)
        a = vm.alloc(200, align=16)
        vm.mem.write(a, good)
        heads = [
            ring.queue.add([Buf(a, 92), Buf(a + 100, 10, write=True)]),  # wrong direction
            ring.queue.add([Buf(a, 8)]),  # shorter than the header
            ring.queue.add([Buf(a, HDR_LEN + 10)]),  # a runt frame
            post_tx(vm, ring, VirtioNetHdr(flags=1, gso_type=1, gso_size=100).pack()
                    + frame(80), kick=False),  # GSO without HOST_TSO4
            ring.queue.add([Buf(vm.mem_size - 8, 64)]),  # outside guest memory
        ]
        ok = post_tx(vm, ring, good)
        assert sorted(used(ring, 6)) == sorted((h, 0) for h in [*heads, ok])
        assert r.link.take() == good
        assert r.link.pending_frames() == []
        assert r.device.stats().tx_bad_chains == 5
        assert r.device.stats().pairs[0].tx_frames == 1


# -- receive --------------------------------------------------------------------
def test_receive_one_chain_per_frame(tmp_path: Path) -> None:
    with rig(tmp_path, BASE) as r:  # no MRG_RXBUF: every chain holds a whole frame
        heads = post_rx(r.vm, r.ring(RX), 1600, 1600)
        r.link.inject(tap_frame(frame(100)))
        r.link.inject(tap_frame(frame(1514, 3)))
        done = used(r.ring(RX), 2)
        assert [n for _, n in done] == [HDR_LEN + 100, HDR_LEN + 1514]
        for (head, n), data in zip(done, (frame(100), frame(1514, 3)), strict=True):
            got = r.vm.mem.read(heads[head], n)
            assert got[:HDR_LEN] == VirtioNetHdr(num_buffers=1).pack()
            assert got[HDR_LEN:] == data


def test_mergeable_buffers_span_chains(tmp_path: Path) -> None:
    with rig(tmp_path, MRG) as r:
        heads = post_rx(r.vm, r.ring(RX), *[512] * 16)
        r.link.inject(tap_frame(frame(1300)))
        done = used(r.ring(RX), 3)
        assert [n for _, n in done] == [512, 512, HDR_LEN + 1300 - 1024]
        got = b"".join(r.vm.mem.read(heads[h], n) for h, n in done)
        assert VirtioNetHdr(num_buffers=3).pack() == got[:HDR_LEN]
        assert got[HDR_LEN:] == frame(1300)
        # the chains not used stay available: the next frame takes the next one
        r.link.inject(tap_frame(frame(40, 9)))
        (head, n), = used(r.ring(RX), 1)
        assert head not in {h for h, _ in done} and n == HDR_LEN + 40
        assert r.vm.mem.read(heads[head] + HDR_LEN, 40) == frame(40, 9)
        assert r.device.stats().pairs[0].rx_frames == 2


def test_receive_from_a_bare_link_writes_the_header(tmp_path: Path) -> None:
    with rig(tmp_path, vnet_hdr=False) as r:
        heads = post_rx(r.vm, r.ring(RX), 2048, 2048)
        r.link.inject(frame(1000))
        (head, n), = used(r.ring(RX), 1)
        assert n == HDR_LEN + 1000
        assert r.vm.mem.read(heads[head], n) == VirtioNetHdr(num_buffers=1).pack() + frame(1000)


def test_tap_header_kept_and_data_valid_only_with_guest_csum(tmp_path: Path) -> None:
    gso = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_DATA_VALID, gso_type=1, hdr_len=54,
                       gso_size=1448)
    for features, flags in ((MRG, 0), (MRG | bit(VIRTIO_NET_F_GUEST_CSUM),
                                       VIRTIO_NET_HDR_F_DATA_VALID)):
        with rig(tmp_path, features) as r:
            heads = post_rx(r.vm, r.ring(RX), 4096)
            r.link.inject(tap_frame(frame(200), gso))
            (head, _), = used(r.ring(RX), 1)
            hdr = VirtioNetHdr(flags, 1, 54, 1448, 0, 0, 1)
            assert r.vm.mem.read(heads[head], HDR_LEN) == hdr.pack()
            assert r.device.stats().pairs[0].rx_gso == 1


def test_frame_longer_than_its_buffer_is_dropped_and_counted(tmp_path: Path) -> None:
    with rig(tmp_path, BASE) as r:
        heads = post_rx(r.vm, r.ring(RX), 100)
        r.link.inject(tap_frame(frame(89)))  # one byte too many
        r.link.inject(tap_frame(frame(500)))
        r.link.inject(tap_frame(frame(88, 1)))  # fills the buffer exactly
        (head, n), = used(r.ring(RX), 1)  # the buffer went to the frame that fits
        assert n == HDR_LEN + 88 == 100
        assert r.vm.mem.read(heads[head] + HDR_LEN, 88) == frame(88, 1)
        assert r.device.stats().rx_truncated == 2


def test_frame_above_the_mtu_makes_mergeable_receive_hold_out_for_more(tmp_path: Path) -> None:
    with rig(tmp_path, MRG) as r:  # MTU 1500: 1530 bytes of buffers are enough...
        assert r.device.cfg.rx_need == HDR_LEN + 1518
        post_rx(r.vm, r.ring(RX), *[1024] * 4)
        r.link.inject(tap_frame(frame(5000)))  # ...until a guest sends more
        wait_for(lambda: r.device.stats().rx_truncated == 1, "the frame to be dropped")
        assert r.device.cfg.rx_need == HDR_LEN + MAX_GSO_FRAME


def test_no_receive_buffers_unwatches_the_link_until_a_kick(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        pair = r.device.pairs[0]
        for i in range(3):
            r.link.inject(tap_frame(frame(60, i)))
        wait_for(lambda: pair.rx_paused and pair.watching == 0, "the link to be unwatched")
        assert r.device.stats().rx_starved >= 1
        # Readable link, no buffers: the daemon thread must sleep, not spin.
        tid = r.daemon.thread.native_id
        assert tid is not None
        before = thread_cpu_ticks(tid)
        time.sleep(0.3)
        assert thread_cpu_ticks(tid) - before <= 3
        heads = post_rx(r.vm, r.ring(RX), *[2048] * 4)  # the kick re-arms the link
        done = used(r.ring(RX), 3)
        for (head, _), i in zip(done, range(3), strict=True):
            assert r.vm.mem.read(heads[head] + HDR_LEN, 60) == frame(60, i)
        assert pair.watching == READ and not pair.rx_paused


def test_mergeable_receive_waits_for_room_for_a_large_frame(tmp_path: Path) -> None:
    features = MRG | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)
    with rig(tmp_path, features) as r:  # a 64 KiB GSO frame may come: 65 KiB needed
        pair, st = r.device.pairs[0], r.device.stats()
        wait_for(lambda: st.rx_starved == 1, "the empty ring to be noticed")
        heads = post_rx(r.vm, r.ring(RX), *[4096] * 8)
        r.link.inject(tap_frame(frame(20000)))
        wait_for(lambda: st.rx_starved == 2 and pair.rx_paused,
                 "reception to wait for more buffers")
        assert r.ring(RX).queue.get_used() == []
        heads |= post_rx(r.vm, r.ring(RX), *[4096] * 10)  # 72 KiB posted now
        done = used(r.ring(RX), 5)
        got = b"".join(r.vm.mem.read(heads[h], n) for h, n in done)
        assert got[10:12] == b"\x05\x00" and got[HDR_LEN:] == frame(20000)


def test_hostile_receive_chains_are_counted_and_survived(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        vm, ring = r.vm, r.ring(RX)
        a = vm.alloc(4096, align=16)
        bad = [
            ring.queue.add([Buf(a, 16), Buf(a + 16, 2048, write=True)]),  # readable part
            ring.queue.add([Buf(a, 8, write=True)]),  # too short for the header
            ring.queue.add([Buf(vm.mem_size - 16, 4096, write=True)]),  # outside memory
        ]
        heads = post_rx(vm, ring, 2048)
        r.link.inject(tap_frame(frame(300)))
        done = used(ring, 4)
        assert sorted(done) == sorted([(h, 0) for h in bad] + [(*heads, HDR_LEN + 300)])
        assert vm.mem.read(heads[next(iter(heads))] + HDR_LEN, 300) == frame(300)
        assert r.device.stats().rx_bad_chains == 3


def test_two_queue_pairs_use_their_own_link_queues(tmp_path: Path) -> None:
    with rig(tmp_path, MRG | bit(VIRTIO_NET_F_MQ), pairs=2) as r:
        assert r.acked & bit(VIRTIO_NET_F_MQ)
        heads = post_rx(r.vm, r.ring(2), 2048)
        r.link.inject(tap_frame(frame(70)), pair=1)
        (head, _), = used(r.ring(2), 1)
        assert r.vm.mem.read(heads[head] + HDR_LEN, 70) == frame(70)
        post_tx(r.vm, r.ring(3), VirtioNetHdr().pack() + frame(90))
        assert used(r.ring(3), 1)
        assert r.link.take(pair=1) == VirtioNetHdr().pack() + frame(90)
        assert [p.rx_frames + p.tx_frames for p in r.device.stats().pairs] == [0, 2]


# -- control queue --------------------------------------------------------------
def ctrl(vm: SyntheticVM, ring: DriverRing, command: bytes, ack: bool = True) -> int:
    src = vm.alloc(len(command), align=16)
    vm.mem.write(src, command)
    dst = vm.alloc(1, align=16)
    vm.mem.write(dst, b"\xaa")
    bufs = [Buf(src, len(command))] + ([Buf(dst, 1, write=True)] if ack else [])
    ring.queue.add(bufs)
    ring.kick_if_needed()
    (_, n), = ring.wait_used()
    return vm.mem.read(dst, 1)[0] if n else -1


def test_control_queue_commands(tmp_path: Path) -> None:
    features = MRG | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_MQ)
    with rig(tmp_path, features, pairs=2, rings=5) as r:
        vm, cq = r.vm, r.ring(4)  # 2 pairs + the control queue last
        assert ctrl(vm, cq, b"\x04\x00" + struct.pack("<H", 1)) == 0  # VQ_PAIRS_SET 1: OK
        assert r.link.active[1] is False and r.device.pairs[1].active is False
        assert ctrl(vm, cq, b"\x04\x00" + struct.pack("<H", 2)) == 0
        assert r.device.pairs[1].active is True
        assert ctrl(vm, cq, b"\x04\x00" + struct.pack("<H", 3)) == 1  # more than there are
        assert ctrl(vm, cq, b"\x04\x00" + struct.pack("<H", 0)) == 1
        assert ctrl(vm, cq, b"\x00\x00\x01") == 0  # PROMISC on
        assert ctrl(vm, cq, b"\x01\x00" + struct.pack("<I", 0) + struct.pack("<I", 0)) == 0
        assert ctrl(vm, cq, b"\x01\x01" + MAC) == 1  # CTRL_MAC_ADDR was not offered
        assert ctrl(vm, cq, b"\x07\x00") == 1  # unknown class
        assert ctrl(vm, cq, b"\x00\x00\x01", ack=False) == -1  # no ack byte: used, 0 bytes
        assert r.device.rx_mode == {0: True}
        st = r.device.stats()
        assert (st.ctrl_ok, st.ctrl_err) == (4, 5)


def test_control_queue_is_queue_2_without_mq(tmp_path: Path) -> None:
    features = MRG | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX)
    with rig(tmp_path, features, pairs=2, rings=3) as r:
        assert not r.acked & bit(VIRTIO_NET_F_MQ)
        assert ctrl(r.vm, r.ring(2), b"\x00\x01\x01") == 0  # ALLMULTI on
        assert ctrl(r.vm, r.ring(2), b"\x04\x00\x01\x00") == 1  # MQ was not negotiated
        assert r.link.active[1] is False  # only pair 0 exists for this driver


def test_frontend_leaving_resets_the_device(tmp_path: Path) -> None:
    features = MRG | bit(VIRTIO_NET_F_GUEST_CSUM)
    with rig(tmp_path, features) as r:
        post_rx(r.vm, r.ring(RX), 2048)
        pair = r.device.pairs[0]
        wait_for(lambda: pair.watching == READ, "the link to be watched")
        r.vm.close()
        wait_for(lambda: not pair.rx_running and pair.watching == 0, "the rings to stop")
        # The device reset comes after the rings stop, on the daemon's thread:
        # wait for it rather than race it.  Offloads are off until the next driver.
        wait_for(lambda: r.link.configured[-1] == (10, 0), "the device reset")
        assert r.link.configured[-1] == (10, 0)


# -- two devices over a peer link ----------------------------------------------------
def test_two_devices_over_a_peer_link(tmp_path: Path) -> None:
    path = str(tmp_path / "link.sock")
    a, b = NetDevice(PeerLink(path), mac=MAC), NetDevice(PeerLink(path), mac=MAC[::-1])
    with DaemonThread(a, tmp_path / "a.sock") as da, DaemonThread(b, tmp_path / "b.sock") as db, \
            SyntheticVM(mem_size=8 << 20) as va, SyntheticVM(mem_size=8 << 20) as vb:
        va.connect(da.path, MRG, num_queues=2, queue_size=QSIZE)
        vb.connect(db.path, MRG, num_queues=2, queue_size=QSIZE)
        rx_a = post_rx(va, va.rings[RX], *[2048] * 4)
        rx_b = post_rx(vb, vb.rings[RX], *[2048] * 4)
        # a listened; it accepts b once it can receive (its link fd turns readable)
        link_a = a.link
        assert isinstance(link_a, PeerLink)
        wait_for(lambda: link_a.state is PeerState.CONNECTED, "a to accept b")
        for vm, peer, heads, seed in ((va, vb, rx_b, 1), (vb, va, rx_a, 2)):
            post_tx(vm, vm.rings[TX], VirtioNetHdr().pack() + frame(500, seed))
            (head, n), = used(peer.rings[RX], 1)
            assert n == HDR_LEN + 500
            assert peer.mem.read(heads[head], n) == VirtioNetHdr(num_buffers=1).pack() + \
                frame(500, seed)
    assert not os.path.exists(path)  # the listener removed its socket


def test_memory_region_sent_once_per_queue_pair(tmp_path: Path) -> None:
    """QEMU's vhost-user-net with MQ sends each pair's memory table over the one
    connection: the same ADD_MEM_REG twice, later REM_MEM_REG twice."""
    with rig(tmp_path, MRG | bit(VIRTIO_NET_F_MQ), pairs=2) as r:
        fe, region = r.vm.frontend, r.vm.region
        assert fe is not None and region is not None
        table = MemRegion(0, r.vm.mem_size, region.user_addr, 0)
        fe.add_mem_reg(table, r.vm.fd)  # pair 1's copy: accepted, nothing remapped
        fe.rem_mem_reg(table)  # pair 1 lets go: pair 0 still has it
        heads = post_rx(r.vm, r.ring(RX), 2048)
        r.link.inject(tap_frame(frame(64)))
        (head, _), = used(r.ring(RX), 1)
        assert r.vm.mem.read(heads[head] + HDR_LEN, 64) == frame(64)
