"""fw_cfg: the port interface, the file directory byte for byte, and DMA into
real (memfd-backed) guest memory, including hostile descriptors."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from dvmm_core.machine.bus import Bus
from dvmm_core.machine.fw_cfg import DmaControl, FwCfg, FwCfgKey
from dvmm_shared.memory import GuestMemory, GuestMemoryError, memfd_region
from hypothesis import given, settings
from hypothesis import strategies as st

MEM_SIZE = 0x10000
HIGH_BASE, HIGH_SIZE = 0x100000, 0x1000
DESC = 0x1000
BUF = 0x2000
NOT_RAM = 0x80000


def guest_memory() -> GuestMemory:
    mem = GuestMemory()
    for gpa, size in ((0, MEM_SIZE), (HIGH_BASE, HIGH_SIZE)):
        fd, region = memfd_region(size, guest_addr=gpa)
        os.close(fd)  # the mapping keeps the memory alive
        mem.add(region)
    return mem


class Rig:
    """fw_cfg on a port bus over guest memory, driven like SeaBIOS drives it."""

    def __init__(self, dma: bool = True) -> None:
        self.mem = guest_memory()
        self.fw = FwCfg(self.mem, dma=dma)
        self.bus = Bus("pio")
        self.fw.register(self.bus)

    def select(self, key: int) -> None:
        self.bus.write(0x510, 2, key)

    def read_bytes(self, n: int) -> bytes:
        return bytes(self.bus.read(0x511, 1) for _ in range(n))

    def item(self, key: int, n: int) -> bytes:
        self.select(key)
        return self.read_bytes(n)

    def dma(self, control: int, length: int, address: int, desc: int = DESC) -> int:
        """Run one DMA descriptor at ``desc``; returns the control word after."""
        self.mem.write(desc, struct.pack(">IIQ", control, length, address))
        self.kick(desc)
        return int(struct.unpack(">I", self.mem.read(desc, 4))[0])

    def kick(self, desc: int) -> None:
        # SeaBIOS: outl(cpu_to_be32(addr), 0x518) -- the port is big-endian.
        self.bus.write(0x518, 4, int.from_bytes(desc.to_bytes(4, "big"), "little"))


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield Rig()


# -- ports ----------------------------------------------------------------------------------------
def test_signature_through_the_data_port(rig: Rig) -> None:
    assert rig.item(FwCfgKey.SIGNATURE, 4) == b"QEMU"
    assert rig.read_bytes(3) == b"\0\0\0"  # past the end: zeros


def test_signature_is_selected_after_reset(rig: Rig) -> None:
    rig.item(FwCfgKey.ID, 2)
    rig.fw.reset()
    assert rig.read_bytes(4) == b"QEMU"


def test_id_advertises_dma(rig: Rig) -> None:
    assert rig.item(FwCfgKey.ID, 4) == struct.pack("<I", 3)
    assert Rig(dma=False).item(FwCfgKey.ID, 4) == struct.pack("<I", 1)


def test_dma_port_reads_signature(rig: Rig) -> None:
    raw = b"".join(rig.bus.read(port, 4).to_bytes(4, "little") for port in (0x514, 0x518))
    assert raw == b"QEMU CFG"


def test_unknown_key_reads_zero(rig: Rig) -> None:
    assert rig.item(0x1234, 4) == b"\0" * 4
    assert rig.item(0xFFFF, 2) == b"\0\0"


def test_write_channel_bit_is_ignored(rig: Rig) -> None:
    assert rig.item(0x4000 | FwCfgKey.SIGNATURE, 4) == b"QEMU"


def test_data_port_writes_are_ignored(rig: Rig) -> None:
    rig.select(FwCfgKey.SIGNATURE)
    rig.bus.write(0x511, 1, 0x41)
    assert rig.read_bytes(4) == b"QEMU"


def test_standard_keys(rig: Rig) -> None:
    rig.fw.set_cpus(2, 4)
    rig.fw.set_ram_size(256 << 20)
    rig.fw.set_nographic(True)
    rig.fw.set_boot_menu(False)
    assert rig.item(FwCfgKey.NB_CPUS, 2) == b"\x02\x00"
    assert rig.item(FwCfgKey.MAX_CPUS, 2) == b"\x04\x00"
    assert rig.item(FwCfgKey.RAM_SIZE, 8) == struct.pack("<Q", 256 << 20)
    assert rig.item(FwCfgKey.NOGRAPHIC, 2) == b"\x01\x00"
    assert rig.item(FwCfgKey.BOOT_MENU, 2) == b"\x00\x00"


# -- files ----------------------------------------------------------------------------------------
def entry(size: int, key: int, name: str) -> bytes:
    return struct.pack(">IHH", size, key, 0) + name.encode().ljust(56, b"\0")


def test_file_directory_layout(rig: Rig) -> None:
    e820 = struct.pack("<QQI", 0, 0x9FC00, 1)
    assert rig.fw.add_file("etc/e820", e820) == 0x20
    assert rig.fw.add_file("bootorder", b"/pci@i0cf8/*@2\n") == 0x21
    assert rig.fw.add_file("etc/boot-fail-wait", struct.pack("<i", -1)) == 0x22
    expected = (struct.pack(">I", 3)
                + entry(15, 0x21, "bootorder")
                + entry(4, 0x22, "etc/boot-fail-wait")
                + entry(20, 0x20, "etc/e820"))
    assert rig.item(FwCfgKey.FILE_DIR, len(expected) + 4) == expected + b"\0" * 4
    assert rig.item(0x20, 20) == e820


def test_empty_directory(rig: Rig) -> None:
    assert rig.item(FwCfgKey.FILE_DIR, 4) == b"\0\0\0\0"


def test_replacing_a_file_keeps_its_key(rig: Rig) -> None:
    key = rig.fw.add_file("etc/x", b"one")
    assert rig.fw.add_file("etc/x", b"three") == key
    assert rig.item(FwCfgKey.FILE_DIR, 8) == struct.pack(">IIH", 1, 5, key)[:8]


@pytest.mark.parametrize("name", ["", "x" * 56, "a\0b"])
def test_bad_file_names_are_refused(rig: Rig, name: str) -> None:
    with pytest.raises(ValueError):
        rig.fw.add_file(name, b"")


# -- DMA ------------------------------------------------------------------------------------------
READ, SKIP, SELECT, WRITE, ERROR = (DmaControl.READ, DmaControl.SKIP, DmaControl.SELECT,
                                    DmaControl.WRITE, DmaControl.ERROR)


def test_dma_select_and_read(rig: Rig) -> None:
    key = rig.fw.add_file("etc/e820", bytes(range(20)))
    assert rig.dma(key << 16 | SELECT | READ, 20, BUF) == 0
    assert rig.mem.read(BUF, 20) == bytes(range(20))


def test_dma_read_past_the_end_zero_fills(rig: Rig) -> None:
    rig.mem.write(BUF, b"\xaa" * 8)
    assert rig.dma(FwCfgKey.SIGNATURE << 16 | SELECT | READ, 8, BUF) == 0
    assert rig.mem.read(BUF, 8) == b"QEMU\0\0\0\0"


def test_dma_skip_then_read_and_port_share_the_offset(rig: Rig) -> None:
    assert rig.dma(FwCfgKey.SIGNATURE << 16 | SELECT | SKIP, 1, 0) == 0
    assert rig.read_bytes(1) == b"E"
    assert rig.dma(READ, 2, BUF) == 0
    assert rig.mem.read(BUF, 2) == b"MU"


def test_dma_zero_control_does_nothing(rig: Rig) -> None:
    rig.select(FwCfgKey.SIGNATURE)
    assert rig.dma(0, 4, NOT_RAM) == 0
    assert rig.read_bytes(4) == b"QEMU"


def test_dma_write_to_a_writable_file(rig: Rig) -> None:
    seen: list[bytes] = []
    key = rig.fw.add_file("etc/ramfb", bytes(28), writable=True, on_write=seen.append)
    cfg = struct.pack(">QIIIII", 0x0FD00000, 0x34325258, 0, 1024, 768, 4096)
    rig.mem.write(BUF, cfg)
    assert rig.dma(key << 16 | SELECT | WRITE, 28, BUF) == 0  # ramfb: control 0x18
    assert seen == [cfg]
    assert rig.fw.file_data("etc/ramfb") == cfg


def test_dma_write_refusals(rig: Rig) -> None:
    ro = rig.fw.add_file("etc/ro", bytes(4))
    rw = rig.fw.add_file("etc/rw", bytes(4), writable=True)
    assert rig.dma(ro << 16 | SELECT | WRITE, 4, BUF) == ERROR
    assert rig.dma(rw << 16 | SELECT | WRITE, 5, BUF) == ERROR  # past the end
    assert rig.dma(0x3FFF << 16 | SELECT | WRITE, 1, BUF) == ERROR  # no item
    assert rig.fw.file_data("etc/ro") == bytes(4)


def test_dma_bad_buffer_sets_error(rig: Rig) -> None:
    assert rig.dma(FwCfgKey.SIGNATURE << 16 | SELECT | READ, 4, NOT_RAM) == ERROR
    assert rig.dma(FwCfgKey.SIGNATURE << 16 | SELECT | READ, 0x20000, 0) == ERROR
    assert rig.dma(FwCfgKey.SIGNATURE << 16 | SELECT | READ, 8, MEM_SIZE - 4) == ERROR
    rw = rig.fw.add_file("etc/rw", bytes(4), writable=True)
    assert rig.dma(rw << 16 | SELECT | WRITE, 4, 2**64 - 2) == ERROR


def test_dma_bad_descriptor_is_dropped(rig: Rig) -> None:
    rig.kick(NOT_RAM)
    rig.kick(MEM_SIZE - 8)  # the descriptor straddles the end of RAM
    rig.select(FwCfgKey.SIGNATURE)
    assert rig.read_bytes(4) == b"QEMU"  # still serving


def test_dma_high_address_register(rig: Rig) -> None:
    rig.mem.write(HIGH_BASE, struct.pack(">IIQ", SELECT | READ, 4, BUF))
    rig.bus.write(0x514, 4, int.from_bytes((0).to_bytes(4, "big"), "little"))
    rig.kick(HIGH_BASE)
    assert rig.mem.read(BUF, 4) == b"QEMU"
    rig.bus.write(0x514, 4, int.from_bytes((1).to_bytes(4, "big"), "little"))
    rig.kick(DESC)  # 0x1_0000_1000 is not RAM: dropped
    assert rig.dma(SELECT | READ, 4, BUF + 4) == 0  # high half was reset
    assert rig.mem.read(BUF + 4, 4) == b"QEMU"


def test_dma_disabled_ignores_the_ports() -> None:
    rig = Rig(dma=False)
    rig.mem.write(DESC, struct.pack(">IIQ", SELECT | READ, 4, BUF))
    rig.kick(DESC)
    assert rig.mem.read(DESC, 4) == struct.pack(">I", SELECT | READ)


# -- hostile guests -------------------------------------------------------------------------------
port_op = st.tuples(
    st.sampled_from([0x510, 0x511, 0x514, 0x515, 0x518, 0x51B]),
    st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF), st.booleans(),
)
address = st.one_of(st.integers(0, MEM_SIZE + 16), st.integers(0, 2**64 - 1),
                    st.integers(HIGH_BASE - 16, HIGH_BASE + HIGH_SIZE))
dma_op = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0x30000), address,
                   st.integers(0, MEM_SIZE + 32))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(port_op, dma_op), max_size=30))
def test_fuzz_ports_and_dma_never_raise(ops: list[tuple[int, int, int, int | bool]]) -> None:
    rig = Rig()
    rig.fw.add_file("etc/rw", bytes(16), writable=True)
    rig.fw.add_file("etc/ro", bytes(range(40)))
    for op in ops:
        if isinstance(op[3], bool):
            port, size, value, is_write = op
            if is_write:
                rig.bus.write(port, size, value & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= rig.bus.read(port, size) < 1 << (8 * size)
        else:
            control, length, addr, desc = op
            _fuzz_dma(rig, control, length, addr, desc)


def _fuzz_dma(rig: Rig, control: int, length: int, addr: int, desc: int) -> None:
    try:
        rig.mem.write(desc, struct.pack(">IIQ", control, length, addr))
    except GuestMemoryError:
        rig.kick(desc)  # a descriptor outside RAM: must be dropped quietly
        return
    rig.bus.write(0x514, 4, 0)  # a random high half from the port ops would miss RAM
    rig.kick(desc)
    assert struct.unpack(">I", rig.mem.read(desc, 4))[0] in (0, ERROR)
