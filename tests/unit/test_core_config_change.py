"""A backend's config change reaches the guest as virtio's configuration-change
interrupt (virtio 1.2 4.1.5.3) through the core.

The link half runs against the real display process (``python -m
dvmm_display``): the core's :class:`VhostUserLink` negotiates BACKEND_REQ,
hands the backend its end of the back-end channel, and a ``resize`` makes the
backend send BACKEND_CONFIG_CHANGE_MSG; the link drops its cached config (the
next read shows virtio-gpu's ``events_read``) and calls the transport.  The
transport half is driven through guest accesses (``test_core_virtio_pci``'s
rig): with MSI-X the config vector's eventfd is bound and signalled, without it
ISR bit 1 is set and INTx raised; ``config_generation`` moves either way.  A
backend that writes garbage on the channel loses only the channel.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_core.backend_channel import BackendChannel
from dvmm_core.vhost_user_frontend import LinkState, VhostUserLink
from dvmm_display.device import VIRTIO_GPU_EVENT_DISPLAY
from dvmm_shared.control import command
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.vhost_user.connection import Connection
from dvmm_shared.vhost_user.message import BackendRequest, ProtocolFeature, decode_u64, encode
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit

from .test_core_vhost_link import Ram, ram  # noqa: F401  (fixture)
from .test_core_virtio_pci import (  # noqa: F401  (fixture)
    ACK,
    BAR1_ADDR,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    GENERATION,
    ISR,
    STATUS,
    Rig,
    rig,
)

GPU_CONFIG_SIZE = 16
MSIX_CONFIG = 0x10  # le16 config_msix_vector in struct virtio_pci_common_cfg


# -- transport: the interrupt ----------------------------------------------------------
def config_changed(r: Rig) -> None:
    """What the link does when its backend says the config changed."""
    assert r.link.on_config_change is not None, "the transport did not hook the link"
    r.link.on_config_change()


def test_msix_config_vector_is_bound_and_signalled(rig: Rig) -> None:  # noqa: F811
    rig.assign()
    rig.enable_msix()
    for v in range(3):
        rig.msix_entry(v, 0xFEE00000 | v << 12, 0x4050 + v, masked=False)
    rig.negotiate(bit(VIRTIO_F_VERSION_1))
    rig.w(MSIX_CONFIG, 2, 0)  # as Linux does, before the queues (vp_find_vqs_msix)
    rig.setup_queue(0, 128, 1)
    rig.setup_queue(1, 128, 2)
    rig.w(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    cfg_fd = rig.transport.config_call.fd
    gsi = rig.router.bound[cfg_fd]
    assert gsi not in {rig.router.bound[c.fd] for c in rig.transport.calls}
    msi = {c[1]: c[2:] for c in rig.router.named("set_msi")}
    assert msi[gsi] == (0xFEE00000, 0, 0x4050)
    generation = rig.r(GENERATION, 1)
    config_changed(rig)
    assert rig.r(GENERATION, 1) == (generation + 1) & 0xFF
    assert int.from_bytes(os.read(cfg_fd, 8), "little") == 1  # one interrupt for KVM
    assert rig.r(ISR, 1) == 0  # with MSI-X, no ISR bit (4.1.4.5)
    rig.mmio.write(BAR1_ADDR + 12, 4, 1)  # the driver masks vector 0: unbound
    assert cfg_fd not in rig.router.bound


def test_without_msix_a_change_sets_isr_bit_1_and_raises_intx(rig: Rig) -> None:  # noqa: F811
    rig.assign()
    rig.transport.intx_gsi = lambda: 11
    rig.init()
    generation = rig.r(GENERATION, 1)
    config_changed(rig)
    assert rig.r(GENERATION, 1) == (generation + 1) & 0xFF
    assert ("irq_line", 11, True) in rig.router.calls
    assert rig.r(ISR, 1) == 2  # reading ISR clears it and lowers the line
    assert rig.router.calls[-1] == ("irq_line", 11, False)
    assert rig.r(ISR, 1) == 0


def test_no_vector_no_interrupt(rig: Rig) -> None:  # noqa: F811
    rig.assign()
    rig.enable_msix()
    rig.init()  # config_msix_vector stays NO_VECTOR
    assert rig.transport.config_call.fd not in rig.router.bound
    config_changed(rig)
    os.set_blocking(rig.transport.config_call.fd, False)
    with pytest.raises(BlockingIOError):
        os.read(rig.transport.config_call.fd, 8)


# -- link: the back-end channel against the real display process ------------------------
@pytest.fixture
def display(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    sock, control, log = tmp_path / "gpu.sock", f"ipc://{tmp_path}/d.ctl", tmp_path / "log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(sock), "--vnc",
                  "127.0.0.1:0", "--control", control, "--size", "640x480"], log)
    try:
        deadline = time.monotonic() + 20
        while not (sock.exists() and os.path.exists(control[6:])) and proc.poll() is None:
            assert time.monotonic() < deadline, "the display process did not listen"
            time.sleep(0.02)  # a fresh process binds its sockets
        assert proc.poll() is None, log_tail(log)
        yield sock, control
    finally:
        assert stop(proc) == 0, log_tail(log)


def test_resize_reaches_the_link_as_a_config_change(display: tuple[Path, str],
                                                     ram: Ram) -> None:  # noqa: F811
    sock, control = display
    changed = threading.Event()
    link = VhostUserLink("gpu0", str(sock), ram.regions, config_size=GPU_CONFIG_SIZE)
    link.on_config_change = changed.set
    link.connect(timeout=10.0)
    try:
        assert link.protocol & 1 << ProtocolFeature.BACKEND_REQ
        assert int.from_bytes(link.get_config(0, 4), "little") == 0  # cached from now on
        reply = command(control, "resize", width=800, height=600)
        assert (reply["width"], reply["height"]) == (800, 600)
        assert changed.wait(10), "no config change reached the link"
        # The cache was dropped: the read goes to the backend and sees the event.
        assert int.from_bytes(link.get_config(0, 4), "little") == VIRTIO_GPU_EVENT_DISPLAY
        assert link.state is LinkState.CONNECTED
    finally:
        link.close()


def test_garbage_on_the_channel_closes_only_the_channel() -> None:
    calls: list[str] = []

    class FakeFrontend:
        def set_backend_req_fd(self, fd: int) -> None:
            self.peer = socket.socket(fileno=os.dup(fd))

    fe = FakeFrontend()
    channel = BackendChannel("gpu0", fe, lambda: calls.append("change"))  # type: ignore[arg-type]
    backend = Connection(fe.peer)
    try:
        backend.sock.sendall(encode(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True))
        channel.serve_one()
        reply = backend.recv(timeout=5)
        assert reply.header.is_reply and decode_u64(reply.payload) == 0
        backend.sock.sendall(encode(BackendRequest.IOTLB_MSG, b"\0" * 8, need_reply=True))
        channel.serve_one()  # not served: refused with a non-zero ack
        assert decode_u64(backend.recv(timeout=5).payload) == 1
        assert calls == ["change"] and not channel.closed
        backend.sock.sendall(b"\xff" * 5)  # half a header, then nothing
        channel.serve_one()
        assert channel.closed and calls == ["change"]
    finally:
        backend.close()
        channel.close()
