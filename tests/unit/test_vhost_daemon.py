"""The vhost-user daemon, served in a thread, driven by a real frontend.

A :class:`SyntheticVM` (memfd guest memory, driver rings, eventfds) brings an
echo device up through the real protocol: features, memory table, rings,
requests, GET_VRING_BASE, disconnect and reconnect.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dvmm_shared.driver import Buf
from dvmm_shared.synthetic import DEFAULT_PROTOCOL, SyntheticVM
from dvmm_shared.vhost_user.connection import Connection
from dvmm_shared.vhost_user.frontend import Frontend, RingSetup
from dvmm_shared.vhost_user.message import VHOST_USER_F_PROTOCOL_FEATURES, Request
from dvmm_shared.virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, bit
from dvmm_shared.virtqueue import DescriptorChain

from .helpers import ECHO_CONFIG, ECHO_FEATURES, DaemonThread, EchoBackend, echo, wait_closed


def test_full_bring_up_and_requests(daemon: DaemonThread, backend: EchoBackend,
                                    vm: SyntheticVM) -> None:
    acked = vm.connect(daemon.path, ECHO_FEATURES, num_queues=2, event_idx=True)
    assert acked == ECHO_FEATURES | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    assert backend.acked_features == ECHO_FEATURES  # without the vhost-user bit
    fe = vm.frontend
    assert fe is not None
    assert fe.protocol_features == DEFAULT_PROTOCOL
    assert fe.get_queue_num() == 2
    assert fe.get_max_mem_slots() == 32
    assert fe.get_config(0, 17) == b"echo-config-space"
    assert fe.get_config(5, 40) == ECHO_CONFIG[5:] + bytes(13)  # zero padded
    assert echo(vm, 0, b"hello") == b"olleh"
    assert echo(vm, 1, b"queue one") == b"eno eueuq"
    assert echo(vm, 1, b"indirect", indirect=True) == b"tceridni"
    assert backend.chains == [(0, 0), (1, 0), (1, 2)]
    st = daemon.daemon.stats
    assert st.queue(0).requests == 1 and st.queue(1).requests == 2
    assert st.protocol_errors == 0 and st.connections == 1


@pytest.mark.parametrize("event_idx", [False, True])
def test_many_requests_wrap_the_ring(daemon: DaemonThread, vm: SyntheticVM,
                                     event_idx: bool) -> None:
    features = ECHO_FEATURES & ~(0 if event_idx else bit(VIRTIO_F_RING_EVENT_IDX))
    vm.connect(daemon.path, features, num_queues=1, queue_size=8, event_idx=event_idx)
    ring = vm.rings[0]
    for batch in range(6):
        expected = {}
        for i in range(1 + batch % 4):  # two descriptors each: 4 fill the ring
            data = bytes([batch, i]) * 3
            src, dst = vm.alloc(6, align=8), vm.alloc(6, align=8)
            vm.mem.write(src, data)
            head = ring.queue.add([Buf(src, 6), Buf(dst, 6, write=True)])
            expected[head] = (dst, data[::-1])
        ring.kick_if_needed()
        done: list[tuple[int, int]] = []
        while len(done) < len(expected):
            done += ring.wait_used()
        assert sorted(h for h, _ in done) == sorted(expected)
        for head, written in done:
            dst, want = expected[head]
            assert written == 6 and vm.mem.read(dst, 6) == want


def test_without_protocol_features_rings_start_enabled(daemon: DaemonThread,
                                                       vm: SyntheticVM) -> None:
    vm.connect(daemon.path, bit(VIRTIO_F_VERSION_1), protocol=0)
    fe = vm.frontend
    assert fe is not None and fe.protocol_features == 0
    assert echo(vm, 0, b"abc") == b"cba"


def test_get_vring_base_returns_the_next_index(daemon: DaemonThread, vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES, num_queues=2)
    for i in range(5):
        echo(vm, 0, bytes([i]) * 4)
    echo(vm, 1, b"x")
    fe = vm.frontend
    assert fe is not None
    assert fe.get_vring_base(0) == 5
    assert fe.get_vring_base(1) == 1
    assert fe.get_vring_base(0) == 5  # stopped: stays put


def test_ring_restarts_from_its_base(daemon: DaemonThread, vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES, num_queues=1, queue_size=16)
    for i in range(3):
        echo(vm, 0, bytes([i]))
    fe, ring = vm.frontend, vm.rings[0]
    assert fe is not None and vm.region is not None
    base = fe.get_vring_base(0)
    assert base == 3
    # Stopped: a new request is not served until the ring is started again.
    src = vm.alloc(2)
    vm.mem.write(src, b"hi")
    head = ring.queue.add([Buf(src, 2), Buf(vm.alloc(2), 2, write=True)])
    ring.kick.signal()
    assert ring.queue.get_used() == []
    lay, u = ring.queue.layout, vm.region.user_addr
    fe.start_ring(RingSetup(0, 16, u + lay.desc_addr, u + lay.avail_addr, u + lay.used_addr,
                            ring.kick.fd, ring.call.fd, base=base))
    assert ring.wait_used() == [(head, 2)]
    assert fe.get_vring_base(0) == 4


def test_reconnect_after_disconnect(daemon: DaemonThread, backend: EchoBackend) -> None:
    for round_ in range(3):
        with SyntheticVM(mem_size=1 << 20) as vm:
            vm.connect(daemon.path, ECHO_FEATURES, num_queues=2)
            assert echo(vm, round_ % 2, b"again") == b"niaga"
        # closing the VM closed the socket; the daemon resets and waits
    assert backend.chains == [(0, 0), (1, 0), (0, 0)]
    fe = Frontend.connect(daemon.path)
    try:
        assert fe.get_features() == ECHO_FEATURES | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        # answered on the new connection, so the old one's close was handled
        assert backend.resets == 3
    finally:
        fe.close()
    assert daemon.daemon.stats.connections == 4


def test_a_new_frontend_replaces_the_old_one(daemon: DaemonThread, backend: EchoBackend) -> None:
    with SyntheticVM(mem_size=1 << 20) as old:
        old.connect(daemon.path, ECHO_FEATURES)
        assert echo(old, 0, b"old") == b"dlo"
        with SyntheticVM(mem_size=1 << 20) as new:
            new.connect(daemon.path, ECHO_FEATURES)
            assert echo(new, 0, b"new") == b"wen"
            assert old.frontend is not None and wait_closed(old.frontend.conn)
            assert backend.resets == 1  # the old session was reset when dropped
    assert daemon.daemon.stats.connections == 2


def test_reset_owner_forgets_the_rings(daemon: DaemonThread, backend: EchoBackend,
                                       vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES)
    assert echo(vm, 0, b"before") == b"erofeb"
    fe = vm.frontend
    assert fe is not None
    fe.conn.send(4)  # RESET_OWNER (deprecated, no reply)
    assert fe.get_vring_base(0) == 0  # a fresh ring: base forgotten
    assert backend.resets == 1


@dataclass
class GatedEcho(EchoBackend):
    """An echo device that holds the daemon loop inside handle_chain until let go."""

    entered: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        self.entered.set()
        self.gate.wait(10)
        return super().handle_chain(queue_index, chain)


def test_frontend_arriving_while_busy_does_not_wedge_the_loop(tmp_path: Path) -> None:
    # While the loop is busy, a new frontend connects and then the old one
    # sends a message: one select() then reports the accept and the old
    # socket.  The old socket's event must not be read from the new session's
    # socket (which has sent nothing), or the loop blocks and ignores stop().
    backend = GatedEcho()
    with DaemonThread(backend, tmp_path / "gated.sock") as dt, \
            SyntheticVM(mem_size=1 << 20) as old:
        old.connect(dt.path, ECHO_FEATURES)
        ring, fe = old.rings[0], old.frontend
        assert fe is not None
        ring.queue.add([Buf(old.alloc(4), 4), Buf(old.alloc(4), 4, write=True)])
        ring.kick.signal()
        assert backend.entered.wait(5)
        new = Connection.connect(dt.path, timeout=5)
        try:
            fe.conn.send(Request.GET_FEATURES)
            backend.gate.set()
            assert wait_closed(fe.conn)  # the old frontend was dropped for the new one
            dt.daemon.stop()
            dt.thread.join(5)
            wedged = dt.thread.is_alive()
            if wedged:
                new.send(Request.GET_FEATURES)  # unblock it so that the test can end
        finally:
            new.close()
        assert not wedged, "the daemon blocked reading a frontend that had sent nothing"


@pytest.mark.parametrize("event_idx", [False, True])
def test_a_lost_kick_is_found_by_the_safety_net(daemon: DaemonThread, vm: SyntheticVM,
                                                event_idx: bool) -> None:
    """A frontend that published a request and never kicked (a lost
    notification): the daemon's slow look at the avail index serves it."""
    features = ECHO_FEATURES & ~(0 if event_idx else bit(VIRTIO_F_RING_EVENT_IDX))
    # (connect returns once the ring is enabled and its first pass is over:
    # every message is acknowledged, REPLY_ACK)
    vm.connect(daemon.path, features, num_queues=1, event_idx=event_idx)
    ring = vm.rings[0]
    src, dst = vm.alloc(4), vm.alloc(4)
    vm.mem.write(src, b"lost")
    head = ring.queue.add([Buf(src, 4), Buf(dst, 4, write=True)])  # no kick
    assert ring.wait_used(timeout=10) == [(head, 4)]
    assert vm.mem.read(dst, 4) == b"tsol"
    rescued = daemon.daemon.faults.channel.faults.rescued
    assert rescued["kicks"] == 1, (rescued, daemon.daemon.stats)
    assert echo(vm, 0, b"again") == b"niaga"
