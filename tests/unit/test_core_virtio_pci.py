"""A virtio-pci function (virtio 1.2 4.1) as a guest sees it.

Real PCI config space, BAR decode and MMIO bus; the vhost-user link, the
interrupt router, the VM and the INTx pump are recording fakes
(:mod:`core_fakes`).  Everything is driven through guest accesses: config
reads and writes on bus 0, and MMIO reads and writes at the BAR addresses.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dvmm_core.machine.bus import Bus
from dvmm_core.machine.pci import PciBus
from dvmm_core.vhost_user_frontend import QueueStart
from dvmm_core.virtio_pci.device import VirtioPciDevice
from dvmm_core.virtio_pci.msix import MSIX_ENABLE, MSIX_FUNCTION_MASK
from dvmm_core.virtio_pci.transport import VirtioTransport
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, VirtioDeviceId, bit
from hypothesis import given, settings
from hypothesis import strategies as st

from .core_fakes import FAKE_CONFIG, FAKE_FEATURES, FakeLink, FakePump, FakeRouter, FakeVm

SLOT = 3
BAR1_ADDR = 0xFEB00000
BAR4_ADDR = 0xFE000000
PCI_COMMAND_MEMORY = 0x2
CMD, STATUS_REG, BAR1_REG, BAR4_REG, INT_LINE = 0x04, 0x06, 0x14, 0x20, 0x3C

# struct virtio_pci_common_cfg offsets (BAR 4 + 0x0000)
DFSELECT, DF, GFSELECT, GF, NUM_QUEUES, STATUS, GENERATION = 0, 4, 8, 0xC, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_DRIVER, Q_DEVICE = 0x20, 0x28, 0x30
ISR, DEVICE_CFG, NOTIFY = 0x1000, 0x2000, 0x3000
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
CAP_VNDR, CAP_MSIX = 0x09, 0x11


@dataclass
class Rig:
    link: FakeLink
    router: FakeRouter
    vm: FakeVm
    pump: FakePump
    mmio: Bus
    pci: PciBus
    dev: VirtioPciDevice
    transport: VirtioTransport

    # -- config space (what 0xCF8/0xCFC reach) -------------------------------
    def cfg_read(self, offset: int, size: int = 4) -> int:
        return self.pci.config_read(0, SLOT, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.pci.config_write(0, SLOT, 0, offset, size, value)

    def caps(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, walked as a guest walks it."""
        assert self.cfg_read(STATUS_REG, 2) & 0x10  # capability list present
        out: list[tuple[int, int]] = []
        ptr = self.cfg_read(0x34, 1)
        while ptr:
            assert len(out) < 48, "capability list loops"
            out.append((ptr, self.cfg_read(ptr, 1)))
            ptr = self.cfg_read(ptr + 1, 1)
        return out

    def vendor_caps(self) -> dict[int, int]:
        """cfg_type -> capability offset."""
        return {self.cfg_read(off + 3, 1): off for off, cid in self.caps() if cid == CAP_VNDR}

    def msix_cap(self) -> int:
        return next(off for off, cid in self.caps() if cid == CAP_MSIX)

    def assign(self, bar4: int = BAR4_ADDR, bar1: int = BAR1_ADDR) -> None:
        self.cfg_write(BAR1_REG, 4, bar1)
        self.cfg_write(BAR4_REG, 4, bar4 & 0xFFFFFFFF)
        self.cfg_write(BAR4_REG + 4, 4, bar4 >> 32)
        self.cfg_write(CMD, 2, self.cfg_read(CMD, 2) | PCI_COMMAND_MEMORY)

    # -- BAR 4 / BAR 1 through the MMIO bus -----------------------------------
    def r(self, offset: int, size: int) -> int:
        return self.mmio.read(BAR4_ADDR + offset, size)

    def w(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(BAR4_ADDR + offset, size, value)

    def w64(self, offset: int, value: int) -> None:
        self.w(offset, 4, value & 0xFFFFFFFF)
        self.w(offset + 4, 4, value >> 32)

    def msix_entry(self, vector: int, addr: int, data: int, masked: bool) -> None:
        base = BAR1_ADDR + 16 * vector
        self.mmio.write(base, 4, addr & 0xFFFFFFFF)
        self.mmio.write(base + 4, 4, addr >> 32)
        self.mmio.write(base + 8, 4, data)
        self.mmio.write(base + 12, 4, int(masked))

    def enable_msix(self, control: int = MSIX_ENABLE) -> None:
        self.cfg_write(self.msix_cap() + 2, 2, control)

    # -- a Linux-like driver --------------------------------------------------
    def negotiate(self, features: int) -> None:
        self.w(STATUS, 1, 0)
        self.w(STATUS, 1, ACK)
        self.w(STATUS, 1, ACK | DRIVER)
        for sel in (0, 1):
            self.w(GFSELECT, 4, sel)
            self.w(GF, 4, (features >> 32 * sel) & 0xFFFFFFFF)
        self.w(STATUS, 1, ACK | DRIVER | FEATURES_OK)
        assert self.r(STATUS, 1) & FEATURES_OK

    def setup_queue(self, q: int, size: int, vector: int = 0xFFFF) -> None:
        self.w(Q_SELECT, 2, q)
        assert self.r(Q_SIZE, 2) == 256
        self.w(Q_SIZE, 2, size)
        assert self.r(Q_NOTIFY_OFF, 2) == q
        self.w(Q_MSIX, 2, vector)
        self.w64(Q_DESC, ring(q))
        self.w64(Q_DRIVER, ring(q) + 0x1000)
        self.w64(Q_DEVICE, ring(q) + 0x2000)
        self.w(Q_ENABLE, 2, 1)

    def init(self, features: int = bit(VIRTIO_F_VERSION_1) | bit(9),
             vectors: tuple[int, ...] = (0xFFFF, 0xFFFF), queues: int = 2) -> None:
        self.negotiate(features)
        for q in range(queues):
            self.setup_queue(q, 128, vectors[q])
        self.w(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)


def ring(q: int) -> int:
    return 0x1_0000_0000 + 0x10000 * q


@pytest.fixture
def rig() -> Iterator[Rig]:
    link, router, vm, pump, mmio = FakeLink(), FakeRouter(), FakeVm(), FakePump(), Bus("mmio")
    transport = VirtioTransport("blk0", link, router, vm, pump)  # type: ignore[arg-type]
    dev = VirtioPciDevice(VirtioDeviceId.BLOCK, transport, mmio)
    pci = PciBus()
    pci.add(SLOT, dev)
    yield Rig(link, router, vm, pump, mmio, pci, dev, transport)
    transport.close()


# -- identity and capabilities ----------------------------------------------------
def test_ids_class_and_revision(rig: Rig) -> None:
    assert rig.cfg_read(0x00, 2) == 0x1AF4
    assert rig.cfg_read(0x02, 2) == 0x1042  # 0x1040 + virtio-blk
    assert rig.cfg_read(0x08, 1) == 1       # revision 1: a modern-only device
    assert rig.cfg_read(0x09, 3) == 0x010000  # mass storage, as QEMU reports it
    assert rig.cfg_read(0x2C, 2) == 0x1AF4
    assert rig.cfg_read(0x3D, 1) == 1       # INTA#


def test_vendor_capability_chain(rig: Rig) -> None:
    caps = rig.caps()
    vendor = [off for off, cid in caps if cid == CAP_VNDR]
    assert [rig.cfg_read(off + 3, 1) for off in vendor] == [1, 3, 4, 2, 5]
    assert [cid for _, cid in caps] == [CAP_VNDR] * 5 + [CAP_MSIX]
    expect = {1: 0x0000, 3: 0x1000, 4: 0x2000, 2: 0x3000}
    for off in vendor[:4]:
        cfg_type = rig.cfg_read(off + 3, 1)
        assert rig.cfg_read(off + 4, 1) == 4, "BAR"
        assert rig.cfg_read(off + 8, 4) == expect[cfg_type], "offset"
        assert rig.cfg_read(off + 12, 4) == 0x1000, "length"
        assert rig.cfg_read(off + 2, 1) == (20 if cfg_type == 2 else 16), "cap_len"
        assert off % 4 == 0
    notify = rig.vendor_caps()[2]
    assert rig.cfg_read(notify + 16, 4) == 4  # notify_off_multiplier
    assert rig.cfg_read(rig.vendor_caps()[5] + 2, 1) == 20  # virtio_pci_cfg_cap


@pytest.mark.parametrize("queues", [1, 2, 4])
def test_msix_capability(queues: int) -> None:
    link = FakeLink(num_queues=queues)
    t = VirtioTransport("blk", link, FakeRouter(), FakeVm(), FakePump())  # type: ignore[arg-type]
    dev = VirtioPciDevice(VirtioDeviceId.BLOCK, t, Bus("mmio"))
    try:
        cap = next(off for off, cid in dev.config.capabilities() if cid == CAP_MSIX)
        control = dev.config_read(cap + 2, 2)
        assert (control & 0x7FF) + 1 == queues + 1  # one per queue plus config
        assert not control & (MSIX_ENABLE | MSIX_FUNCTION_MASK)
        table, pba = dev.config_read(cap + 4, 4), dev.config_read(cap + 8, 4)
        assert (table & 7, table & ~7) == (1, 0x000)
        assert (pba & 7, pba & ~7) == (1, 0x800)
        assert t.msix.table_bytes <= 0x800  # the table stays below the PBA
    finally:
        t.close()


def test_common_cfg_shows_the_links_queues_and_features(rig: Rig) -> None:
    rig.assign()
    assert rig.r(NUM_QUEUES, 2) == 2
    rig.w(DFSELECT, 4, 0)
    low = rig.r(DF, 4)
    rig.w(DFSELECT, 4, 1)
    assert low | rig.r(DF, 4) << 32 == FAKE_FEATURES


def test_offered_mask_hides_features() -> None:
    link = FakeLink()
    t = VirtioTransport("blk", link, FakeRouter(), FakeVm(), FakePump(),  # type: ignore[arg-type]
                        offered_mask=~bit(9))
    try:
        assert t.common.device_features == FAKE_FEATURES & ~bit(9)
    finally:
        t.close()


# -- BARs ---------------------------------------------------------------------------
def test_bar_sizing(rig: Rig) -> None:
    for reg in range(0x10, 0x28, 4):
        rig.cfg_write(reg, 4, 0xFFFFFFFF)
    assert rig.cfg_read(BAR1_REG) == 0xFFFFF000            # 4 KiB, 32-bit memory
    assert rig.cfg_read(BAR4_REG) == 0xFFFFC00C            # 16 KiB, 64-bit, prefetchable
    assert rig.cfg_read(BAR4_REG + 4) == 0xFFFFFFFF
    for reg in (0x10, 0x18, 0x1C):                         # no BARs 0, 2, 3
        assert rig.cfg_read(reg) == 0


def test_nothing_decodes_before_memory_decode_is_enabled(rig: Rig) -> None:
    rig.cfg_write(BAR1_REG, 4, BAR1_ADDR)
    rig.cfg_write(BAR4_REG, 4, BAR4_ADDR)
    assert rig.mmio.find(BAR4_ADDR) is None and rig.mmio.find(BAR1_ADDR) is None
    assert rig.vm.ioeventfds == []
    assert rig.r(NUM_QUEUES, 2) == 0xFFFF  # unclaimed


def test_assigned_bars_go_on_the_bus_with_one_doorbell_per_queue(rig: Rig) -> None:
    rig.assign()
    bar4, bar1 = rig.mmio.find(BAR4_ADDR), rig.mmio.find(BAR1_ADDR)
    assert bar4 is not None and (bar4.base, bar4.length) == (BAR4_ADDR, 0x4000)
    assert bar1 is not None and (bar1.base, bar1.length) == (BAR1_ADDR, 0x1000)
    kicks = [k.fd for k in rig.transport.kicks]
    assert rig.vm.live_ioeventfds() == {(kicks[0], BAR4_ADDR + 0x3000),
                                        (kicks[1], BAR4_ADDR + 0x3004)}
    assert all(length == 0 for _, _, length, _ in rig.vm.ioeventfds)  # any write width


def test_moving_bar4_moves_the_doorbells(rig: Rig) -> None:
    rig.assign()
    new = 0xFD000000
    rig.vm.ioeventfds.clear()
    rig.cfg_write(BAR4_REG, 4, new)
    kicks = [k.fd for k in rig.transport.kicks]
    for q, fd in enumerate(kicks):
        old_at = rig.vm.ioeventfds.index((fd, BAR4_ADDR + 0x3000 + 4 * q, 0, True))
        new_at = rig.vm.ioeventfds.index((fd, new + 0x3000 + 4 * q, 0, False))
        assert old_at < new_at  # deassign first: KVM refuses a duplicate fd otherwise
    assert rig.mmio.find(BAR4_ADDR) is None
    window = rig.mmio.find(new)
    assert window is not None and window.length == 0x4000
    assert rig.mmio.read(new + NUM_QUEUES, 2) == 2


def test_bar4_above_4g(rig: Rig) -> None:
    high = 0x8_0000_0000
    rig.assign(bar4=high)
    assert rig.dev.bar_address(4) == high
    assert rig.mmio.read(high + NUM_QUEUES, 2) == 2
    fds = {fd for fd, _ in rig.vm.live_ioeventfds()}
    assert {addr for _, addr in rig.vm.live_ioeventfds()} == {high + 0x3000, high + 0x3004}
    assert fds == {k.fd for k in rig.transport.kicks}


def test_disabling_decode_removes_everything(rig: Rig) -> None:
    rig.assign()
    rig.cfg_write(CMD, 2, 0)
    assert rig.mmio.find(BAR4_ADDR) is None and rig.mmio.find(BAR1_ADDR) is None
    assert rig.vm.live_ioeventfds() == set()


def test_ioeventfd_failure_is_not_fatal(rig: Rig) -> None:
    rig.vm.fail_ioeventfd = True
    rig.assign()  # doorbells trap instead
    rig.w(NOTIFY + 4, 2, 1)
    assert rig.transport.kicks[1].consume() == 1


def test_a_doorbell_write_that_traps_kicks_the_backend(rig: Rig) -> None:
    rig.assign()
    rig.w(NOTIFY + 0, 2, 0)
    assert rig.transport.kicks[0].consume() == 1
    assert rig.transport.kicks[1].consume() == 0
    rig.w(NOTIFY + 4 * 7, 2, 7)  # no such queue
    assert [k.consume() for k in rig.transport.kicks] == [0, 0]


# -- the driver's initialisation ----------------------------------------------------
def test_driver_init_starts_the_link_with_the_queues(rig: Rig) -> None:
    rig.assign()
    features = bit(VIRTIO_F_VERSION_1) | bit(9)
    rig.init(features)
    starts = rig.link.named("start")
    assert len(starts) == 1
    _, acked, queues = starts[0]
    assert acked == features
    t = rig.transport
    assert queues == [QueueStart(q, 128, ring(q), ring(q) + 0x1000, ring(q) + 0x2000,
                                 t.kicks[q].fd, t.calls[q].fd) for q in range(2)]
    assert rig.r(STATUS, 1) == 0x0F


def test_only_enabled_queues_are_started(rig: Rig) -> None:
    rig.assign()
    rig.init(queues=1)
    (_, _, queues), = rig.link.named("start")
    assert [q.index for q in queues] == [0]


def test_unacceptable_features_never_start_the_link(rig: Rig) -> None:
    rig.assign()
    rig.w(STATUS, 1, ACK | DRIVER)
    rig.w(GFSELECT, 4, 0)
    rig.w(GF, 4, 1 << 3)  # not offered, and no VERSION_1
    rig.w(STATUS, 1, ACK | DRIVER | FEATURES_OK)
    assert not rig.r(STATUS, 1) & FEATURES_OK
    rig.w(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert rig.link.named("start") == []


def test_status_zero_stops_the_link(rig: Rig) -> None:
    rig.assign()
    rig.init()
    rig.link.calls.clear()
    rig.w(STATUS, 1, 0)
    assert rig.link.named("stop") == [("stop",)]
    assert rig.r(STATUS, 1) == 0
    rig.w(Q_SELECT, 2, 0)
    assert rig.r(Q_ENABLE, 2) == 0 and rig.r(Q_SIZE, 2) == 256


def test_device_config_reads_and_writes_go_to_the_link(rig: Rig) -> None:
    rig.assign()
    assert rig.r(DEVICE_CFG + 8, 4) == int.from_bytes(FAKE_CONFIG[8:12], "little")
    assert rig.r(DEVICE_CFG + 0, 8) == int.from_bytes(FAKE_CONFIG[0:8], "little")
    assert ("get_config", 8, 4) in rig.link.calls
    rig.w(DEVICE_CFG + 0x20, 1, 0xAB)
    assert ("set_config", 0x20, b"\xab") in rig.link.calls


# -- MSI-X ----------------------------------------------------------------------------
def test_msix_vectors_become_msi_routes_with_bound_call_fds(rig: Rig) -> None:
    rig.assign()
    rig.enable_msix()
    for v in range(3):
        rig.msix_entry(v, 0xFEE00000 | v << 12, 0x4040 + v, masked=False)
    rig.init(vectors=(1, 2))
    calls = [c.fd for c in rig.transport.calls]
    gsi = rig.router.bound
    assert set(gsi) == set(calls)
    assert gsi[calls[0]] != gsi[calls[1]] and min(gsi.values()) >= 24
    msi = {c[1]: c[2:] for c in rig.router.named("set_msi")}
    assert msi[gsi[calls[0]]] == (0xFEE01000, 0, 0x4041)
    assert msi[gsi[calls[1]]] == (0xFEE02000, 0, 0x4042)
    assert rig.pump.watched == {}  # no INTx pumping with MSI-X on


def test_masking_a_vector_unbinds_and_unmasking_rebinds(rig: Rig) -> None:
    rig.assign()
    rig.enable_msix()
    for v in range(3):
        rig.msix_entry(v, 0xFEE00000, 0x4040 + v, masked=False)
    rig.init(vectors=(1, 2))
    call0 = rig.transport.calls[0].fd
    gsi0 = rig.router.bound[call0]
    allocated = len(rig.router.named("allocate"))
    rig.router.clear()
    rig.mmio.write(BAR1_ADDR + 16 + 12, 4, 1)  # mask vector 1
    assert ("unbind", call0) in rig.router.calls
    assert call0 not in rig.router.bound
    assert rig.transport.calls[1].fd in rig.router.bound
    rig.mmio.write(BAR1_ADDR + 16 + 12, 4, 0)
    assert rig.router.bound[call0] == gsi0
    assert len(rig.router.named("allocate")) == 0 and allocated == 2


def test_function_mask_and_msix_disable_unbind_everything(rig: Rig) -> None:
    rig.assign()
    rig.enable_msix()
    for v in range(3):
        rig.msix_entry(v, 0xFEE00000, 0x4040 + v, masked=False)
    rig.init(vectors=(1, 2))
    rig.enable_msix(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    assert rig.router.bound == {}
    rig.enable_msix(MSIX_ENABLE)
    assert len(rig.router.bound) == 2
    rig.enable_msix(0)  # back to INTx: the core watches the call fds itself
    assert rig.router.bound == {}
    assert set(rig.pump.watched) == {c.fd for c in rig.transport.calls}


def test_queue_without_a_vector_is_not_bound(rig: Rig) -> None:
    rig.assign()
    rig.enable_msix()
    rig.msix_entry(1, 0xFEE00000, 0x4041, masked=False)
    rig.init(vectors=(1, 0xFFFF))
    assert set(rig.router.bound) == {rig.transport.calls[0].fd}
    assert rig.pump.watched == {}


def test_msix_table_reads_back_through_bar1(rig: Rig) -> None:
    rig.assign()
    rig.msix_entry(2, 0x1_FEE0_5000, 0x4077, masked=True)
    assert rig.mmio.read(BAR1_ADDR + 32, 8) == 0x1_FEE0_5000
    assert rig.mmio.read(BAR1_ADDR + 32 + 8, 4) == 0x4077
    assert rig.mmio.read(BAR1_ADDR + 32 + 12, 4) == 1
    assert rig.mmio.read(BAR1_ADDR + 0x800, 8) == 0  # PBA
    rig.mmio.write(BAR1_ADDR + 0x800, 8, (1 << 64) - 1)  # the PBA is read-only
    assert rig.mmio.read(BAR1_ADDR + 0x800, 8) == 0


# -- INTx --------------------------------------------------------------------------------
def test_intx_fire_sets_isr_and_raises_the_line_until_isr_is_read(rig: Rig) -> None:
    rig.assign()
    rig.cfg_write(INT_LINE, 1, 11)  # what the firmware programmed
    rig.init()
    calls = [c.fd for c in rig.transport.calls]
    assert set(rig.pump.watched) == set(calls)
    assert rig.router.named("bind") == []
    rig.pump.fire(calls[1])
    assert rig.router.named("irq_line") == [("irq_line", 11, True)]
    rig.pump.fire(calls[0])  # already high: no second edge
    assert rig.router.named("irq_line") == [("irq_line", 11, True)]
    assert rig.r(ISR, 1) == 1  # queue interrupt
    assert rig.router.named("irq_line")[-1] == ("irq_line", 11, False)
    assert rig.r(ISR, 1) == 0  # reading cleared it
    assert len(rig.router.named("irq_line")) == 2


def test_enabling_msix_stops_the_intx_pump(rig: Rig) -> None:
    rig.assign()
    rig.init()
    assert len(rig.pump.watched) == 2
    rig.enable_msix()
    assert rig.pump.watched == {}
    unwatched = {fd for c, fd in rig.pump.calls if c == "unwatch"}
    assert unwatched == {c.fd for c in rig.transport.calls}


def test_reset_lowers_a_raised_line(rig: Rig) -> None:
    rig.assign()
    rig.cfg_write(INT_LINE, 1, 10)
    rig.init()
    rig.pump.fire(rig.transport.calls[0].fd)
    rig.w(STATUS, 1, 0)
    assert rig.router.named("irq_line")[-1] == ("irq_line", 10, False)
    assert rig.r(ISR, 1) == 0


# -- a backend that is gone --------------------------------------------------------------
def test_link_down_never_reaches_the_guest(rig: Rig) -> None:
    rig.assign()
    rig.link.down = True
    assert rig.r(DEVICE_CFG, 4) == 0xFFFFFFFF
    assert rig.r(DEVICE_CFG + 4, 2) == 0xFFFF
    rig.w(DEVICE_CFG, 4, 0)  # dropped
    generation = rig.r(GENERATION, 1)
    rig.init()  # start fails
    assert rig.link.named("start")
    status = rig.r(STATUS, 1)
    assert status & NEEDS_RESET
    assert rig.r(GENERATION, 1) != generation
    rig.w(STATUS, 1, 0)  # stop fails too; the reset still happens
    assert rig.link.named("stop")
    assert rig.r(STATUS, 1) == 0


# -- VIRTIO_PCI_CAP_PCI_CFG ----------------------------------------------------------------
def test_pci_cfg_window_reads_and_writes_bar4(rig: Rig) -> None:
    cap = rig.vendor_caps()[5]
    # No BAR is assigned: this is how firmware may reach the registers.
    rig.cfg_write(cap + 4, 1, 4)          # bar
    rig.cfg_write(cap + 8, 4, NUM_QUEUES)  # offset
    rig.cfg_write(cap + 12, 4, 2)         # length
    assert rig.cfg_read(cap + 16, 4) & 0xFFFF == 2
    rig.cfg_write(cap + 8, 4, STATUS)
    rig.cfg_write(cap + 12, 4, 1)
    rig.cfg_write(cap + 16, 4, ACK)
    assert rig.transport.common.status == ACK
    rig.cfg_write(cap + 8, 4, DEVICE_CFG + 4)
    rig.cfg_write(cap + 12, 4, 4)
    assert rig.cfg_read(cap + 16, 4) == int.from_bytes(FAKE_CONFIG[4:8], "little")


@pytest.mark.parametrize("bar,offset,length", [
    (1, STATUS, 1),          # only BAR 4 is reachable
    (4, STATUS, 3),          # length must be 1, 2 or 4
    (4, 0x3FFE, 4),          # runs past the BAR
    (4, 0xFFFFFFFF, 1),
])
def test_pci_cfg_window_ignores_bad_requests(rig: Rig, bar: int, offset: int,
                                             length: int) -> None:
    cap = rig.vendor_caps()[5]
    rig.cfg_write(cap + 4, 1, bar)
    rig.cfg_write(cap + 8, 4, offset)
    rig.cfg_write(cap + 12, 4, length)
    rig.cfg_write(cap + 16, 4, 0x0F)
    assert rig.transport.common.status == 0
    assert rig.cfg_read(cap + 16, 4) == 0x0F  # the data field just holds what was written


def test_pci_cfg_window_header_is_read_only(rig: Rig) -> None:
    cap = rig.vendor_caps()[5]
    rig.cfg_write(cap, 4, 0xFFFFFFFF)
    assert rig.cfg_read(cap, 1) == CAP_VNDR
    assert rig.cfg_read(cap + 3, 1) == 5
    assert rig.cfg_read(cap + 2, 1) == 20


# -- machine reset ---------------------------------------------------------------------------
def test_machine_reset_unmaps_and_stops(rig: Rig) -> None:
    rig.assign()
    rig.enable_msix()
    rig.msix_entry(1, 0xFEE00000, 0x4041, masked=False)
    rig.init(vectors=(1, 1))
    rig.pci.reset()
    assert rig.link.named("stop")
    assert rig.mmio.find(BAR4_ADDR) is None and rig.mmio.find(BAR1_ADDR) is None
    assert rig.vm.live_ioeventfds() == set()
    assert rig.router.bound == {}
    assert not rig.transport.msix.enabled
    assert rig.cfg_read(BAR4_REG) == 0x0C and rig.cfg_read(CMD, 2) == 0
    # The guest can bring it up again from scratch.
    rig.link.calls.clear()
    rig.assign()
    rig.init()
    assert len(rig.link.named("start")) == 1


def test_isr_and_the_line_agree_when_the_pump_races_an_isr_read() -> None:
    # The INTx pump fires on its own thread while a vCPU reads ISR: after
    # both stop, a set ISR bit must mean a raised line (else the interrupt is
    # lost until the next completion).  Tiny switch intervals make the
    # threads interleave inside each operation.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(40):
            router = FakeRouter()
            t = VirtioTransport("blk", FakeLink(), router, FakeVm(),  # type: ignore[arg-type]
                                FakePump())
            t.intx_gsi = lambda: 11
            pump = threading.Thread(target=lambda t=t: [t._intx_fire() for _ in range(300)])
            pump.start()
            while pump.is_alive():
                t.bar4_read(ISR, 1)
            pump.join()
            levels = [c[2] for c in router.named("irq_line")]
            assert bool(t.isr) == (bool(levels) and levels[-1]), "ISR and INTx line disagree"
            assert all(a != b for a, b in itertools.pairwise(levels))  # edges only
            t.close()
    finally:
        sys.setswitchinterval(old)


# -- a hostile guest ---------------------------------------------------------------------------
ADDRESSES = st.sampled_from([0, BAR1_ADDR, BAR4_ADDR, BAR4_ADDR + 0x1000, BAR4_ADDR + 0x3000,
                             0xFFFFFFFF, 0xFFFFF000, 0x8])
CONFIG_WRITE = st.tuples(
    st.just("cfg"),
    st.one_of(st.sampled_from([CMD, BAR1_REG, BAR4_REG, BAR4_REG + 4, 0x34, INT_LINE]),
              st.integers(0, 0xFF)),
    st.sampled_from([1, 2, 4]),
    st.one_of(ADDRESSES, st.sampled_from([0x2, 0x6, 0x8000, 0xC000]), st.integers(0, 0xFFFFFFFF)))
MMIO_WRITE = st.tuples(
    st.just("mmio"),
    st.one_of(ADDRESSES, st.integers(BAR4_ADDR, BAR4_ADDR + 0x4000)),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, (1 << 64) - 1))


@settings(max_examples=250, deadline=None)
@given(st.booleans(), st.lists(st.one_of(CONFIG_WRITE, MMIO_WRITE), max_size=40))
def test_hostile_config_and_mmio_writes_never_raise(
        assigned: bool, ops: list[tuple[str, int, int, int]]) -> None:
    link, router, vm, pump, mmio = FakeLink(), FakeRouter(), FakeVm(), FakePump(), Bus("mmio")
    transport = VirtioTransport("blk0", link, router, vm, pump)  # type: ignore[arg-type]
    dev = VirtioPciDevice(VirtioDeviceId.BLOCK, transport, mmio)
    pci = PciBus()
    pci.add(SLOT, dev)
    rig = Rig(link, router, vm, pump, mmio, pci, dev, transport)
    try:
        if assigned:
            rig.assign()
        for kind, addr, size, value in ops:
            if kind == "cfg":
                rig.cfg_write(addr, size, value)
                assert 0 <= rig.cfg_read(addr, size) < 1 << 8 * size
            else:
                mmio.write(addr, size, value & ((1 << 8 * size) - 1))
                assert 0 <= mmio.read(addr, size) < 1 << 8 * size
            bar4 = dev.bar_address(4)
            expect = set() if bar4 is None else {
                (k.fd, bar4 + 0x3000 + 4 * q) for q, k in enumerate(transport.kicks)}
            assert vm.live_ioeventfds() == expect
            for index, size_ in ((1, 0x1000), (4, 0x4000)):
                base = dev.bar_address(index)
                found = None if base is None else mmio.find(base)
                if found is not None and found.device is dev._windows[index]:
                    assert (found.base, found.length) == (base, size_)
    finally:
        transport.close()


def test_overlapping_bars_do_not_crash_the_config_write(rig: Rig) -> None:
    rig.assign()
    # BAR 1 moved into the middle of BAR 4: undefined on hardware, but the
    # guest's config write must not blow up the VMM.
    rig.cfg_write(BAR1_REG, 4, BAR4_ADDR + 0x1000)
    assert rig.r(NUM_QUEUES, 2) == 2  # BAR 4 still answers
    rig.cfg_write(BAR1_REG, 4, BAR1_ADDR)  # and the guest can fix it
    assert rig.mmio.read(BAR1_ADDR + 12, 4) == 1  # MSI-X vector 0 control: masked
    assert rig.r(NUM_QUEUES, 2) == 2
    # The same with BAR 1 at exactly BAR 4's base, then moved away again:
    # BAR 4's window must survive.
    rig.cfg_write(BAR1_REG, 4, BAR4_ADDR)
    rig.cfg_write(BAR1_REG, 4, BAR1_ADDR)
    assert rig.r(NUM_QUEUES, 2) == 2
    assert rig.mmio.read(BAR1_ADDR + 12, 4) == 1
