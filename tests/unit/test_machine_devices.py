"""The small PC devices: 16550A serial, CMOS/RTC, i8042, port 0x92, 0xCF9,
debug console and POST port, driven through the port-I/O bus as a guest
drives them."""

from __future__ import annotations

import calendar
import datetime
import threading

import pytest
from dvmm_core.machine.bus import Bus
from dvmm_core.machine.cmos import Cmos, from_bcd
from dvmm_core.machine.i8042 import I8042
from dvmm_core.machine.platform import (
    DebugCon,
    FastA20,
    PostCode,
    ResetControl,
)
from dvmm_core.machine.serial import COM1_BASE, Serial
from hypothesis import given, settings
from hypothesis import strategies as st

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 3, 4, 5, 6, 7
FCR = 2
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class SerialRig:
    """A COM1 on a port bus, with its output and IRQ level recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[bool] = []
        self.uart = Serial(self.out.extend, self.levels.append)
        self.bus = Bus("pio")
        self.uart.register(self.bus)

    def inb(self, reg: int) -> int:
        return self.bus.read(COM1_BASE + reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.bus.write(COM1_BASE + reg, 1, value)

    @property
    def irq(self) -> bool:
        return self.uart.irq_level


@pytest.fixture
def com1() -> SerialRig:
    return SerialRig()


# -- serial: detection values ---------------------------------------------------------------------
def test_serial_idle_registers(com1: SerialRig) -> None:
    assert com1.inb(LSR) == 0x60  # THRE | TEMT: firmware never waits
    assert com1.inb(IIR) == 0x01  # no interrupt pending
    assert com1.inb(IER) == 0x00
    assert com1.inb(MSR) == 0xB0  # DCD | DSR | CTS
    assert not com1.irq


def test_serial_seabios_detection_sequence(com1: SerialRig) -> None:
    # SeaBIOS serial.c: IER <- 0x02, IER must echo, IIR & 0x3f must be 0x02.
    com1.outb(IER, 0x02)
    assert com1.inb(IER) == 0x02
    assert com1.inb(IIR) & 0x3F == 0x02
    com1.outb(IER, 0x00)
    assert com1.inb(IIR) == 0x01


def test_serial_ier_echo_keeps_low_nibble(com1: SerialRig) -> None:
    com1.outb(IER, 0x0F)
    assert com1.inb(IER) == 0x0F
    com1.outb(IER, 0xF5)
    assert com1.inb(IER) == 0x05  # bits 7:4 are always 0 on a 16550A


def test_serial_scratch_and_lcr_read_back(com1: SerialRig) -> None:
    com1.outb(SCR, 0x5A)
    com1.outb(LCR, 0x03)
    assert (com1.inb(SCR), com1.inb(LCR)) == (0x5A, 0x03)


def test_serial_fifo_bits_in_iir(com1: SerialRig) -> None:
    com1.outb(FCR, 0x07)
    assert com1.inb(IIR) == 0xC1  # 16550A: both FIFO bits
    com1.outb(FCR, 0x00)
    assert com1.inb(IIR) == 0x01


def test_serial_dlab_switches_to_divisor(com1: SerialRig) -> None:
    com1.outb(IER, 0x01)
    com1.outb(LCR, 0x83)
    com1.outb(THR, 0x01)
    com1.outb(IER, 0x00)
    assert (com1.inb(0), com1.inb(1)) == (0x01, 0x00)
    assert com1.out == b""  # a divisor write is not a character
    com1.outb(LCR, 0x03)
    assert com1.inb(IER) == 0x01  # the real IER was untouched


def test_serial_loopback_msr_and_data(com1: SerialRig) -> None:
    # Linux 8250 autoconfig: MCR = LOOP | OUT2 | RTS must give MSR & 0xF0 == 0x90.
    com1.outb(MCR, 0x1A)
    assert com1.inb(MSR) & 0xF0 == 0x90
    com1.outb(THR, ord("x"))
    assert com1.out == b""
    assert com1.inb(LSR) & 0x01
    assert com1.inb(THR) == ord("x")


# -- serial: output and THRE interrupt ------------------------------------------------------------
def test_serial_output_goes_to_sink(com1: SerialRig) -> None:
    for ch in b"hello\n":
        com1.outb(THR, ch)
    assert com1.out == b"hello\n"
    assert com1.inb(LSR) == 0x60


def test_serial_thre_interrupt_lifecycle(com1: SerialRig) -> None:
    com1.outb(IER, 0x02)
    assert com1.irq  # enabling THRI with THR empty raises it
    assert com1.inb(IIR) == 0x02
    assert not com1.irq  # reading IIR that reported THRE cleared it
    assert com1.inb(IIR) == 0x01
    com1.outb(THR, ord("a"))
    assert com1.irq  # the write drained: THRE pending again
    assert com1.levels == [True, False, True]


def test_serial_thr_write_gives_a_fresh_edge(com1: SerialRig) -> None:
    com1.outb(IER, 0x02)
    before = len(com1.levels)
    com1.outb(THR, ord("a"))  # line was high: lowered and raised again
    assert com1.levels[before:] == [False, True]


def test_serial_disabling_ier_lowers_the_line(com1: SerialRig) -> None:
    com1.outb(IER, 0x02)
    com1.outb(IER, 0x00)
    assert not com1.irq
    assert com1.levels == [True, False]


# -- serial: receive ------------------------------------------------------------------------------
def test_serial_feed_sets_dr_and_interrupt(com1: SerialRig) -> None:
    com1.uart.feed(b"ok")
    assert com1.inb(LSR) == 0x61
    assert not com1.irq  # RDI not enabled yet
    com1.outb(IER, 0x01)
    assert com1.irq
    assert com1.inb(IIR) == 0x04
    assert com1.inb(THR) == ord("o")
    assert com1.irq
    assert com1.inb(THR) == ord("k")
    assert not com1.irq
    assert com1.inb(LSR) == 0x60
    assert com1.inb(IIR) == 0x01


def test_serial_rx_has_priority_over_thre(com1: SerialRig) -> None:
    com1.outb(IER, 0x03)
    com1.uart.feed(b"z")
    assert com1.inb(IIR) == 0x04
    com1.inb(THR)
    assert com1.inb(IIR) == 0x02


def test_serial_fcr_clears_rx_fifo(com1: SerialRig) -> None:
    com1.uart.feed(b"abc")
    com1.outb(FCR, 0x03)
    assert com1.inb(LSR) & 0x01 == 0


def test_serial_feed_is_thread_safe(com1: SerialRig) -> None:
    chunks = [bytes([i]) * 100 for i in range(8)]
    threads = [threading.Thread(target=com1.uart.feed, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = bytearray()
    while com1.inb(LSR) & 0x01:
        got.append(com1.inb(THR))
    assert sorted(got) == sorted(b"".join(chunks))


def test_serial_reset_lowers_irq(com1: SerialRig) -> None:
    com1.outb(IER, 0x02)
    com1.uart.reset()
    assert not com1.irq
    assert com1.inb(IER) == 0


def test_serial_wide_access_is_split(com1: SerialRig) -> None:
    com1.bus.write(COM1_BASE + LCR, 2, 0x0B03)  # LCR=0x03, MCR=0x0B
    assert (com1.inb(LCR), com1.inb(MCR)) == (0x03, 0x0B)
    assert com1.bus.read(COM1_BASE + MSR, 2) == 0x00B0  # MSR, then SCR
    assert com1.bus.read(COM1_BASE + SCR, 2) == 0xFF00  # past the UART: open bus


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF), st.booleans()), max_size=60))
def test_serial_fuzz_never_raises(ops: list[tuple[int, int, int, bool]]) -> None:
    rig = SerialRig()
    for reg, size, value, is_write in ops:
        if is_write:
            rig.bus.write(COM1_BASE + reg, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= rig.bus.read(COM1_BASE + reg, size) < 1 << (8 * size)
    # irq() is called only on changes, so the levels alternate from True.
    assert rig.levels == [i % 2 == 0 for i in range(len(rig.levels))]


# -- CMOS -----------------------------------------------------------------------------------------
def cmos_read(bus: Bus, reg: int) -> int:
    bus.write(0x70, 1, reg | 0x80)  # with the NMI-mask bit, which is ignored
    return bus.read(0x71, 1)


def cmos_bus(cmos: Cmos) -> Bus:
    bus = Bus("pio")
    cmos.register(bus)
    return bus


@pytest.mark.parametrize(
    ("below", "above", "ext", "above16", "above4g"),
    [
        (256 * MiB, 0, 0xFFFF, (240 * MiB) // (64 * KiB), 0),
        (3 * GiB, 1 * GiB, 0xFFFF, (3 * GiB - 16 * MiB) // (64 * KiB), 1 * GiB // (64 * KiB)),
        (3 * GiB, 5 * GiB, 0xFFFF, (3 * GiB - 16 * MiB) // (64 * KiB), 5 * GiB // (64 * KiB)),
        (32 * MiB, 0, 31 * 1024, (16 * MiB) // (64 * KiB), 0),
    ],
    ids=["256M", "4G", "8G", "32M"],
)
def test_cmos_memory_fields(below: int, above: int, ext: int, above16: int,
                            above4g: int) -> None:
    bus = cmos_bus(Cmos(below, above, ncpus=4))

    def word(lo: int) -> int:
        return cmos_read(bus, lo) | cmos_read(bus, lo + 1) << 8

    assert word(0x15) == 640
    assert word(0x17) == ext
    assert word(0x30) == ext
    assert word(0x34) == above16
    assert word(0x5B) | cmos_read(bus, 0x5D) << 16 == above4g
    assert cmos_read(bus, 0x5F) == 3
    assert cmos_read(bus, 0x3D) == 0x02  # hard disk first
    assert cmos_read(bus, 0x38) & 0xF0 == 0


def test_cmos_status_registers() -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1))
    assert cmos_read(bus, 0x0A) == 0x26  # UIP clear
    assert cmos_read(bus, 0x0B) == 0x02  # 24 h, BCD
    assert cmos_read(bus, 0x0C) == 0x00
    assert cmos_read(bus, 0x0D) == 0x80  # valid RAM and time
    bus.write(0x70, 1, 0x0A)
    bus.write(0x71, 1, 0xA6)
    assert cmos_read(bus, 0x0A) == 0x26  # UIP is read-only


FIXED = calendar.timegm((2024, 2, 29, 13, 5, 9))  # a Thursday


def test_cmos_time_is_bcd_from_the_host_clock() -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: FIXED))
    regs = {r: cmos_read(bus, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)}
    assert regs == {0: 0x09, 2: 0x05, 4: 0x13, 6: 0x05, 7: 0x29, 8: 0x02, 9: 0x24, 0x32: 0x20}


def test_cmos_time_binary_and_12h_modes() -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: FIXED))
    bus.write(0x70, 1, 0x0B)
    bus.write(0x71, 1, 0x04)  # binary, 12-hour
    assert cmos_read(bus, 0) == 9
    assert cmos_read(bus, 4) == 0x80 | 1  # 1 PM
    assert cmos_read(bus, 9) == 24


def test_cmos_real_clock_is_sane() -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1))
    now = datetime.datetime.now(datetime.UTC)
    year = from_bcd(cmos_read(bus, 0x32)) * 100 + from_bcd(cmos_read(bus, 9))  # type: ignore[operator]
    assert abs(year - now.year) <= 1
    for reg, hi in ((0, 59), (2, 59), (4, 23), (7, 31), (8, 12)):
        value = from_bcd(cmos_read(bus, reg))
        assert value is not None and 0 <= value <= hi


def cmos_write(bus: Bus, reg: int, value: int) -> None:
    bus.write(0x70, 1, reg)
    bus.write(0x71, 1, value)


def test_cmos_guest_sets_one_field() -> None:
    t = [float(FIXED)]
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: t[0]))
    cmos_write(bus, 9, 0x28)  # year 2028 (Feb 29 exists)
    assert cmos_read(bus, 9) == 0x28
    cmos_write(bus, 4, 0x1A)  # not BCD: ignored
    assert cmos_read(bus, 4) == 0x13
    t[0] += 61
    assert cmos_read(bus, 2) == 0x06  # the clock keeps running


def test_cmos_set_bit_sequence_like_linux() -> None:
    # mc146818_set_time: B |= SET, year, month, day, hours, minutes, seconds, B.
    t = [float(FIXED)]
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: t[0]))
    cmos_write(bus, 0x0B, 0x82)
    t[0] += 5
    assert cmos_read(bus, 0) == 0x09  # frozen while SET is on
    for reg, value in ((9, 0x23), (8, 0x02), (7, 0x28), (4, 0x07), (2, 0x30), (0, 0x00)):
        cmos_write(bus, reg, value)
    assert cmos_read(bus, 7) == 0x28
    cmos_write(bus, 0x0B, 0x02)
    t[0] += 2
    regs = [cmos_read(bus, r) for r in (9, 8, 7, 4, 2, 0)]
    assert regs == [0x23, 0x02, 0x28, 0x07, 0x30, 0x02]


def test_cmos_odd_date_normalises() -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: FIXED))
    cmos_write(bus, 9, 0x23)  # Feb 29 2023 does not exist: becomes Mar 1
    assert (cmos_read(bus, 8), cmos_read(bus, 7)) == (0x03, 0x01)


def test_cmos_plain_registers_and_index_port() -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1))
    bus.write(0x70, 1, 0x40)
    bus.write(0x71, 1, 0xAB)
    assert cmos_read(bus, 0x40) == 0xAB
    assert cmos_read(bus, 0xC0) == 0xAB  # NMI bit ignored: same register
    assert bus.read(0x70, 1) == 0xFF


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=60))
def test_cmos_fuzz_never_raises(ops: list[tuple[int, int, int]]) -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: FIXED))
    for port, size, value in ops:
        bus.write(0x70 + port, size, value & ((1 << (8 * size)) - 1))
        bus.read(0x70 + port, size)
    for reg in range(0x80):  # every register still reads, whatever the guest did
        assert 0 <= cmos_read(bus, reg) <= 0xFF


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 2, 4, 6, 7, 8, 9, 0x0B, 0x32]),
                          st.integers(0, 0xFF)), max_size=40))
def test_cmos_fuzz_clock_registers(writes: list[tuple[int, int]]) -> None:
    bus = cmos_bus(Cmos(256 * MiB, 0, 1, clock=lambda: FIXED))
    for reg, value in writes:
        cmos_write(bus, reg, value)
    for reg in (0, 2, 4, 6, 7, 8, 9, 0x32):
        cmos_read(bus, reg)


# -- reset paths, debug console, POST -------------------------------------------------------------
class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_i8042_reads_ff_and_resets_on_fe() -> None:
    resets, bus = Resets(), Bus("pio")
    I8042(resets, present=False).register(bus)
    assert bus.read(0x64, 1) == 0xFF  # SeaBIOS's keyboard probe ends at once
    assert bus.read(0x60, 1) == 0xFF
    bus.write(0x64, 1, 0xAD)
    bus.write(0x60, 1, 0xFE)
    assert resets.count == 0
    bus.write(0x64, 1, 0xFE)
    assert resets.count == 1
    assert bus.find(0x61) is None  # the PIT speaker port is left alone


def test_port92_reads_a20_and_fast_resets() -> None:
    resets, bus = Resets(), Bus("pio")
    FastA20(resets).register(bus)
    assert bus.read(0x92, 1) == 0x02
    bus.write(0x92, 1, 0x02)
    assert resets.count == 0
    bus.write(0x92, 1, 0x03)
    assert resets.count == 1


def test_cf9_resets_on_rst_cpu() -> None:
    resets, bus = Resets(), Bus("pio")
    ResetControl(resets).register(bus)
    bus.write(0xCF9, 1, 0x02)
    assert resets.count == 0
    assert bus.read(0xCF9, 1) == 0x02
    bus.write(0xCF9, 1, 0x06)  # SeaBIOS's and Linux's hard reset
    assert resets.count == 1
    bus.write(0xCF9, 1, 0x0E)
    assert resets.count == 2
    assert bus.read(0xCF9, 1) == 0x0A


def test_debugcon_magic_and_lines() -> None:
    lines: list[bytes] = []
    bus, con = Bus("pio"), DebugCon(lines.append)
    con.register(bus)
    assert bus.read(0x402, 1) == 0xE9
    for ch in b"SeaBIOS\nhalf":
        bus.write(0x402, 1, ch)
    assert lines == [b"SeaBIOS\n"]
    con.flush()
    assert lines == [b"SeaBIOS\n", b"half"]


def test_debugcon_bounds_a_line_without_newline() -> None:
    lines: list[bytes] = []
    con = DebugCon(lines.append, max_line=8)
    for _ in range(20):
        con.write(0, 1, ord("x"))
    assert lines == [b"x" * 8, b"x" * 8]


def test_post_code_is_ignored() -> None:
    bus, post = Bus("pio"), PostCode()
    post.register(bus)
    bus.write(0x80, 1, 0x42)
    assert post.last == 0x42
    assert bus.read(0x80, 1) == 0xFF
