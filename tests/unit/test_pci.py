"""PCI: config mechanism #1, BAR sizing and decode tracking, capabilities,
write masks, and the i440FX / PIIX3 functions, driven through 0xCF8/0xCFC."""

from __future__ import annotations

import pytest
from dvmm_core.machine.bus import Bus
from dvmm_core.machine.pci import (
    ROM_SLOT,
    BarKind,
    I440fxHostBridge,
    PciBus,
    PciDevice,
    Piix3IsaBridge,
    pci_slot_pirq,
)
from hypothesis import given, settings
from hypothesis import strategies as st

CMD_IO, CMD_MEM = 0x1, 0x2
Move = tuple[int, int | None, int | None]


class RecordingDevice(PciDevice):
    """A virtio-like function that records every bar_changed call."""

    def __init__(self) -> None:
        super().__init__(0x1AF4, 0x1042, 0x010000, revision=1, interrupt_pin=1)
        self.moves: list[Move] = []
        self.add_bar(0, 32, "io")
        self.add_bar(1, 0x1000, BarKind.MEM32)
        self.add_bar(4, 0x4000, BarKind.MEM64, prefetch=True)
        self.add_rom_bar(0x10000)

    def bar_changed(self, index: int, old: int | None, new: int | None) -> None:
        self.moves.append((index, old, new))


class Machine:
    """Bus 0 with the host bridge, PIIX3 and a recording device in slot 3."""

    def __init__(self) -> None:
        self.pam: list[tuple[int, int]] = []
        self.pirq: list[tuple[int, int]] = []
        self.pci = PciBus()
        self.host = I440fxHostBridge(on_pam_write=lambda r, v: self.pam.append((r, v)))
        self.isa = Piix3IsaBridge(on_pirq_write=lambda p, v: self.pirq.append((p, v)))
        self.dev = RecordingDevice()
        self.pci.add(0, self.host)
        self.pci.add(1, self.isa)
        self.pci.add(3, self.dev)
        self.bus = Bus("pio")
        self.pci.register(self.bus)

    def addr(self, slot: int, reg: int, fn: int = 0, bus: int = 0) -> None:
        self.bus.write(0xCF8, 4, 0x80000000 | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC))

    def read(self, slot: int, reg: int, size: int = 4) -> int:
        self.addr(slot, reg)
        return self.bus.read(0xCFC + (reg & 3), size)

    def write(self, slot: int, reg: int, value: int, size: int = 4) -> None:
        self.addr(slot, reg)
        self.bus.write(0xCFC + (reg & 3), size, value)


@pytest.fixture
def m() -> Machine:
    return Machine()


# -- mechanism #1 ---------------------------------------------------------------------------------
def test_config_address_latch_reads_back(m: Machine) -> None:
    m.bus.write(0xCF8, 4, 0x80000000)
    assert m.bus.read(0xCF8, 4) == 0x80000000
    m.bus.write(0xCF8, 1, 0x12)  # only dword accesses reach the latch
    assert m.bus.read(0xCF8, 4) == 0x80000000
    assert m.bus.read(0xCF8, 2) == 0xFFFF


def test_host_bridge_and_isa_bridge_ids(m: Machine) -> None:
    assert m.read(0, 0x00) == 0x12378086
    assert m.read(0, 0x08) >> 8 == 0x060000
    assert m.read(1, 0x00) == 0x70008086
    assert m.read(1, 0x08) >> 8 == 0x060100
    assert m.read(0, 0x0E, 1) == 0x00


def test_sub_dword_reads_at_every_data_offset(m: Machine) -> None:
    assert m.read(0, 0x02, 2) == 0x1237
    assert m.read(0, 0x01, 1) == 0x80
    assert m.read(0, 0x03, 1) == 0x12


def test_absent_functions_read_all_ones(m: Machine) -> None:
    assert m.read(2, 0x00) == 0xFFFFFFFF
    m.addr(0, 0, fn=1)
    assert m.bus.read(0xCFC, 4) == 0xFFFFFFFF
    m.addr(0, 0, bus=1)
    assert m.bus.read(0xCFC, 4) == 0xFFFFFFFF
    m.bus.write(0xCF8, 4, 0x00000000)  # enable bit clear
    assert m.bus.read(0xCFC, 4) == 0xFFFFFFFF
    m.bus.write(0xCFC, 4, 0)  # and writes go nowhere


def test_cf9_is_left_free_for_reset_control(m: Machine) -> None:
    assert m.bus.find(0xCF9) is None


# -- BAR sizing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reg", "probe", "expected"),
    [
        (0x10, 0xFFFFFFFF, 0xFFFFFFE1),  # 32-byte I/O
        (0x14, 0xFFFFFFFF, 0xFFFFF000),  # 4 KiB mem32
        (0x20, 0xFFFFFFFF, 0xFFFFC00C),  # 16 KiB mem64, prefetchable
        (0x24, 0xFFFFFFFF, 0xFFFFFFFF),  # its upper half
        (0x30, 0xFFFFF800, 0xFFFF0000),  # 64 KiB ROM, enable bit not written
        (0x30, 0xFFFFFFFF, 0xFFFF0001),
        (0x18, 0xFFFFFFFF, 0x00000000),  # unimplemented BAR
    ],
)
def test_bar_sizing(m: Machine, reg: int, probe: int, expected: int) -> None:
    m.write(3, reg, probe)
    assert m.read(3, reg) == expected


def test_bar_flags_before_sizing(m: Machine) -> None:
    assert [m.read(3, r) for r in (0x10, 0x14, 0x20, 0x24, 0x30)] == [1, 0, 0x0C, 0, 0]


def test_bad_bar_declarations_are_refused() -> None:
    dev = RecordingDevice()
    with pytest.raises(ValueError):
        dev.add_bar(5, 0x1000, "mem64")  # needs two slots
    with pytest.raises(ValueError):
        dev.add_bar(2, 0x1800, "mem32")  # not a power of two
    with pytest.raises(ValueError):
        dev.add_bar(5, 0x1000, "mem32")  # taken by BAR 4's upper half
    with pytest.raises(ValueError):
        dev.add_bar(6, 0x1000, "mem32")  # the ROM has its own call
    with pytest.raises(ValueError):
        dev.add_bar(2, 8, "mem32")  # below the 16-byte minimum
    assert dev.add_bar(3, 0x1000, "mem32").index == 3


# -- decode tracking ------------------------------------------------------------------------------
def program(m: Machine) -> None:
    m.write(3, 0x10, 0xC040)
    m.write(3, 0x14, 0xFEBF0000)
    m.write(3, 0x20, 0xFE800000)
    m.write(3, 0x24, 0)


def test_no_bar_changed_while_decode_is_off(m: Machine) -> None:
    program(m)
    assert m.dev.moves == []
    assert m.dev.bar_address(1) is None


def test_decode_enable_and_disable(m: Machine) -> None:
    program(m)
    m.write(3, 0x04, CMD_MEM, size=2)
    assert m.dev.moves == [(1, None, 0xFEBF0000), (4, None, 0xFE800000)]
    m.write(3, 0x04, CMD_MEM | CMD_IO, size=2)
    assert m.dev.moves[-1] == (0, None, 0xC040)
    m.dev.moves.clear()
    m.write(3, 0x04, CMD_IO, size=2)
    assert m.dev.moves == [(1, 0xFEBF0000, None), (4, 0xFE800000, None)]
    assert m.dev.bar_address(0) == 0xC040


def test_bar_move_is_reported(m: Machine) -> None:
    program(m)
    m.write(3, 0x04, CMD_MEM, size=2)
    m.dev.moves.clear()
    m.write(3, 0x14, 0xFEBE0000)
    m.write(3, 0x24, 0x1)  # 64-bit BAR above 4 GiB
    assert m.dev.moves == [(1, 0xFEBF0000, 0xFEBE0000), (4, 0xFE800000, 0x1FE800000)]


def test_sizing_with_decode_on_is_not_a_move(m: Machine) -> None:
    program(m)
    m.write(3, 0x04, CMD_MEM | CMD_IO, size=2)
    m.dev.moves.clear()
    for reg, orig in ((0x10, 0xC041), (0x14, 0xFEBF0000), (0x20, 0xFE80000C), (0x24, 0)):
        m.write(3, reg, 0xFFFFFFFF)
        m.read(3, reg)
        m.write(3, reg, orig)
    assert m.dev.moves == []
    assert m.dev.bar_address(4) == 0xFE800000


def test_rom_bar_needs_its_enable_bit(m: Machine) -> None:
    m.write(3, 0x04, CMD_MEM, size=2)
    m.write(3, 0x30, 0xFEB00000)
    assert m.dev.moves == []
    m.write(3, 0x30, 0xFEB00001)
    assert m.dev.moves == [(ROM_SLOT, None, 0xFEB00000)]


def test_io_bar_beyond_port_space_does_not_decode(m: Machine) -> None:
    m.write(3, 0x10, 0x00120000)
    m.write(3, 0x04, CMD_IO, size=2)
    assert m.dev.moves == []


def test_reset_unmaps_and_restores(m: Machine) -> None:
    program(m)
    m.write(3, 0x04, CMD_MEM | CMD_IO, size=2)
    m.write(3, 0x3C, 11, size=1)
    m.dev.moves.clear()
    m.pci.reset()
    assert sorted(m.dev.moves) == [(0, 0xC040, None), (1, 0xFEBF0000, None),
                                   (4, 0xFE800000, None)]
    assert m.read(3, 0x14) == 0 and m.read(3, 0x3C, 1) == 0
    assert m.read(1, 0x60) == 0x80808080


# -- masks and capabilities -----------------------------------------------------------------------
def test_read_only_fields_are_not_writable(m: Machine) -> None:
    before = [m.read(3, r) for r in (0x00, 0x08, 0x0C, 0x2C, 0x34)]
    for reg in (0x00, 0x08, 0x2C, 0x34):
        m.write(3, reg, 0xFFFFFFFF)
    m.write(3, 0x0C, 0xFFFF0000)  # header type and BIST bytes
    assert [m.read(3, r) for r in (0x00, 0x08, 0x0C, 0x2C, 0x34)] == before
    assert m.read(3, 0x3D, 1) == 1  # interrupt pin


def test_command_and_status_masks(m: Machine) -> None:
    m.write(3, 0x04, 0xFFFF, size=2)
    assert m.read(3, 0x04, 2) == 0x0547
    m.dev.config.set(0x06, 2, 0x8010)  # a detected parity error, plus CAP_LIST
    m.write(3, 0x06, 0x8000 | 0x0010, size=2)
    assert m.read(3, 0x06, 2) == 0x0010  # W1C cleared the error; CAP_LIST stays


def test_capability_chain() -> None:
    dev = PciDevice(0x1AF4, 0x1042, 0x010000)
    first = dev.config.add_capability(0x09, bytes([16, 1]) + bytes(12))
    second = dev.config.add_capability(0x09, bytes([16, 2]) + bytes(12))
    third = dev.config.add_capability(0x11, bytes(10), wmask=b"\x00\xc0" + bytes(8))
    assert (first, second, third) == (0x40, 0x50, 0x60)
    assert dev.config_read(0x06, 2) & 0x10
    assert dev.config_read(0x34, 1) == first
    assert dev.config_read(first, 2) == 0x09 | second << 8
    assert dev.config_read(second, 2) == 0x09 | third << 8
    assert dev.config_read(third, 2) == 0x11
    assert list(dev.config.capabilities()) == [(0x40, 9), (0x50, 9), (0x60, 0x11)]
    dev.config_write(third, 4, 0xFFFFFFFF)
    assert dev.config_read(third, 4) == 0xC0000011  # only the MSI-X-like enable bits


def test_capability_overflow_is_refused() -> None:
    dev = PciDevice(0x1AF4, 0x1042, 0)
    with pytest.raises(ValueError):
        dev.config.add_capability(0x09, bytes(200))


# -- chipset --------------------------------------------------------------------------------------
def test_pam_registers_are_writable_and_reported(m: Machine) -> None:
    assert m.read(0, 0x59, 1) == 0
    m.write(0, 0x59, 0x30, size=1)  # SeaBIOS's shadow unlock
    m.write(0, 0x5C, 0x33333333)  # PAM3-PAM6
    assert m.read(0, 0x58) == 0x30 << 8
    assert m.pam == [(0x59, 0x30), (0x5C, 0x33), (0x5D, 0x33), (0x5E, 0x33), (0x5F, 0x33)]
    m.write(0, 0x59, 0x30, size=1)
    assert len(m.pam) == 5  # unchanged values are not reported


def test_smram_default(m: Machine) -> None:
    assert m.read(0, 0x72, 1) == 0x02
    m.write(0, 0x72, 0xFF, size=1)
    assert m.read(0, 0x72, 1) == 0x7A


def test_pirq_routing(m: Machine) -> None:
    assert m.isa.pirq_irq(0) is None
    m.write(1, 0x60, 0x0B0B0A0A)  # SeaBIOS: 10, 10, 11, 11
    assert [m.isa.pirq_irq(i) for i in range(4)] == [10, 10, 11, 11]
    assert m.pirq == [(0, 10), (1, 10), (2, 11), (3, 11)]
    m.write(1, 0x60, 0xFF, size=1)
    assert m.read(1, 0x60, 1) == 0x8F and m.isa.pirq_irq(0) is None


def test_slot_swizzle() -> None:
    assert [pci_slot_pirq(3, pin) for pin in (1, 2, 3, 4)] == [2, 3, 0, 1]
    assert pci_slot_pirq(1, 1) == 0


def test_slots_are_checked(m: Machine) -> None:
    with pytest.raises(ValueError):
        m.pci.add(3, RecordingDevice())
    with pytest.raises(ValueError):
        m.pci.add(32, RecordingDevice())


# -- hostile guests -------------------------------------------------------------------------------
config_op = st.tuples(st.sampled_from([0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF]),
                      st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF), st.booleans())
targeted = st.tuples(st.sampled_from([0, 1, 3]), st.integers(0, 255),
                     st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(config_op, targeted), max_size=60))
def test_fuzz_config_writes_never_raise(ops: list[tuple[int, int, int, int | bool]]) -> None:
    m = Machine()
    ids = [m.read(s, 0) for s in (0, 1, 3)]
    for op in ops:
        if isinstance(op[3], bool):
            port, size, value, is_write = op
            if is_write:
                m.bus.write(port, size, value & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= m.bus.read(port, size) < 1 << (8 * size)
        else:
            slot, reg, size, value = op
            m.write(slot, reg, value & ((1 << (8 * size)) - 1), size=size)
    assert [m.read(s, 0) for s in (0, 1, 3)] == ids
    assert all(old != new for _, old, new in m.dev.moves)
    for index, _, new in m.dev.moves[-1:]:
        assert m.dev.bar_address(index) == new
