"""The i8042 controller with its PS/2 keyboard and mouse, driven by the
command sequences SeaBIOS sends (src/hw/ps2port.c: ps2_keyboard_setup,
__ps2_command, handle_09) and Linux's i8042 probe, through the port bus
as a guest drives them; input events as the display process sends them."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvmm_core.core_control import CoreControl
from dvmm_core.machine.bus import Bus
from dvmm_core.machine.i8042 import (
    I8042,
    InputError,
    KeyEvent,
    PointerEvent,
    parse_input_events,
)
from dvmm_core.machine.keymap import KEYS, KEYSYMS, SET2_TO_SET1
from dvmm_core.machine.ps2 import QUEUE_MAX
from dvmm_core.supervisor import Supervisor
from dvmm_shared.control import ControlError, command
from hypothesis import given, settings
from hypothesis import strategies as st

DATA, STATUS = 0x60, 0x64
OBF, AUXDATA, SYSFLAG = 0x01, 0x20, 0x04
CTR_KBDINT, CTR_AUXINT, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 0x01, 0x02, 0x10, 0x20, 0x40
# SeaBIOS ps2port.h: (send << 12) | (receive << 8) | command
I8042_CMD_CTL_RCTR, I8042_CMD_CTL_WCTR, I8042_CMD_CTL_TEST = 0x0120, 0x1060, 0x01AA
I8042_CMD_KBD_TEST, I8042_CMD_AUX_SEND = 0x01AB, 0x10D4
ATKBD_CMD_SETLEDS, ATKBD_CMD_SSCANSET, ATKBD_CMD_GSCANSET = 0x10ED, 0x10F0, 0x11F0
ATKBD_CMD_GETID, ATKBD_CMD_ENABLE, ATKBD_CMD_RESET_DIS = 0x02F2, 0x00F4, 0x00F5
ATKBD_CMD_RESET_BAT = 0x02FF
PSMOUSE_CMD_RESET_BAT, PSMOUSE_CMD_ENABLE, PSMOUSE_CMD_GETID = 0x02FF, 0x00F4, 0x02F2
PSMOUSE_CMD_SETRATE = 0x10F3
XK_Escape, XK_F12, XK_Up, XK_Shift_L = 0xFF1B, 0xFFC9, 0xFF52, 0xFFE1
POLLS = 100  # a byte is there at once or never: a bounded poll, never a sleep


class Rig:
    """The controller on a port bus, the IRQ lines and resets recorded, and
    SeaBIOS's driver functions written against the ports."""

    def __init__(self, present: bool = True) -> None:
        self.irqs: list[tuple[int, bool]] = []
        self.resets = 0
        self.kbc = I8042(self._reset, lambda gsi, level: self.irqs.append((gsi, level)),
                         present=present)
        self.bus = Bus("pio")
        self.kbc.register(self.bus)
        self.ps2ctr = CTR_KBDDIS | CTR_AUXDIS  # SeaBIOS's Ps2ctr during setup

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)

    def level(self, gsi: int) -> bool:
        return next((lvl for g, lvl in reversed(self.irqs) if g == gsi), False)

    # -- SeaBIOS ps2port.c, minus the delays ------------------------------------
    def wait_read(self) -> None:
        for _ in range(POLLS):
            if self.inb(STATUS) & OBF:
                return
        raise TimeoutError("i8042_wait_read")

    def i8042_command(self, command: int, param: list[int] | None = None) -> list[int]:
        param = list(param or [])
        assert not self.inb(STATUS) & 0x02  # i8042_wait_write
        self.outb(STATUS, command & 0xFF)
        for byte in param[:(command >> 12) & 0xF]:
            self.outb(DATA, byte)
        out = []
        for _ in range((command >> 8) & 0xF):
            self.wait_read()
            out.append(self.inb(DATA))
        return out

    def recvbyte(self, aux: bool, needack: bool) -> int:
        for _ in range(POLLS):
            status = self.inb(STATUS)
            if status & OBF:
                data = self.inb(DATA)
                if bool(status & AUXDATA) == aux and (not needack or data in (0xFA, 0xFE)):
                    return data
        raise TimeoutError("ps2_recvbyte")

    def sendbyte(self, aux: bool, byte: int) -> None:
        if aux:
            self.i8042_command(I8042_CMD_AUX_SEND, [byte])
        else:
            self.outb(DATA, byte)
        assert self.recvbyte(aux, True) == 0xFA

    def ps2_command(self, aux: bool, command: int, param: list[int] | None = None) -> list[int]:
        """__ps2_command: interrupts off and both ports disabled, the target
        port enabled, the command, then Ps2ctr restored."""
        param = list(param or [])
        newctr = (self.ps2ctr | CTR_AUXDIS | CTR_KBDDIS) & ~(CTR_KBDINT | CTR_AUXINT)
        self.i8042_command(I8042_CMD_CTL_WCTR, [newctr])
        newctr &= ~(CTR_AUXDIS if aux else CTR_KBDDIS)
        self.i8042_command(I8042_CMD_CTL_WCTR, [newctr])
        try:
            self.sendbyte(aux, command & 0xFF)
            if command == ATKBD_CMD_RESET_BAT:
                first = self.recvbyte(aux, False)
                try:  # "Some devices only respond with one byte on reset."
                    return [first, self.recvbyte(aux, False)]
                except TimeoutError:
                    return [first, 0]
            if command == ATKBD_CMD_GETID:  # only keyboard IDs have a second byte
                first = self.recvbyte(aux, False)
                if first in (0xAB, 0xAC, 0x2B, 0x5D, 0x60, 0x47):
                    return [first, self.recvbyte(aux, False)]
                return [first]
            for byte in param[:(command >> 12) & 0xF]:
                self.sendbyte(aux, byte)
            return [self.recvbyte(aux, False) for _ in range((command >> 8) & 0xF)]
        finally:
            self.i8042_command(I8042_CMD_CTL_WCTR, [self.ps2ctr])

    def keyboard_setup(self) -> None:
        """ps2_keyboard_setup, checking what SeaBIOS checks."""
        assert not self.inb(STATUS) & OBF  # i8042_flush finds nothing
        assert self.i8042_command(I8042_CMD_CTL_TEST) == [0x55]
        assert self.i8042_command(I8042_CMD_KBD_TEST) == [0x00]
        self.ps2ctr = CTR_KBDDIS | CTR_AUXDIS
        assert self.ps2_command(False, ATKBD_CMD_RESET_BAT)[0] == 0xAA
        self.ps2_command(False, ATKBD_CMD_RESET_DIS)
        self.ps2_command(False, ATKBD_CMD_SSCANSET, [0x02])
        self.ps2ctr = CTR_AUXDIS | CTR_XLATE | CTR_KBDINT
        self.ps2_command(False, ATKBD_CMD_ENABLE)

    def handle_09(self) -> int | None:
        """INT 09h: what the keyboard IRQ handler reads."""
        status = self.inb(STATUS)
        if status & AUXDATA or not status & OBF:
            return None
        return self.inb(DATA)

    def keys(self, *events: tuple[int, bool]) -> int:
        return self.kbc.input([KeyEvent(sym, down) for sym, down in events])

    def drain_irq1(self) -> list[int]:
        """Serve IRQ 1 while it is raised, as the guest's handler would."""
        out = []
        while self.level(1):
            byte = self.handle_09()
            assert byte is not None
            out.append(byte)
        return out


@pytest.fixture
def rig() -> Rig:
    return Rig()


@pytest.fixture
def booted(rig: Rig) -> Rig:
    rig.keyboard_setup()
    rig.irqs.clear()
    return rig


def test_seabios_keyboard_setup_succeeds(rig: Rig) -> None:
    rig.keyboard_setup()
    assert rig.inb(STATUS) & SYSFLAG  # the self-test passed
    assert rig.i8042_command(I8042_CMD_CTL_RCTR) == [CTR_AUXDIS | CTR_XLATE | CTR_KBDINT]
    info = rig.kbc.info()
    assert info["scanning"] and info["scancode_set"] == 2 and info["translate"]
    assert not rig.inb(STATUS) & OBF  # nothing left over
    assert not rig.level(1)


def test_escape_arrives_translated_to_set_1_through_irq1(booted: Rig) -> None:
    assert booted.keys((XK_Escape, True)) == 1
    assert booted.irqs[-1] == (1, True)
    assert booted.drain_irq1() == [0x01]
    booted.keys((XK_Escape, False))
    assert booted.drain_irq1() == [0x81]


def test_each_queued_byte_gives_a_new_irq_edge(booted: Rig) -> None:
    booted.keys((XK_Up, True), (XK_Up, False))
    assert booted.drain_irq1() == [0xE0, 0x48, 0xE0, 0xC8]
    rises = [lvl for gsi, lvl in booted.irqs if gsi == 1]
    assert rises == [True, False] * 4  # one edge per byte for an edge-triggered PIC


def test_f12_is_0x58_in_set_1_and_07_in_set_2(booted: Rig) -> None:
    booted.keys((XK_F12, True), (XK_F12, False))
    assert booted.drain_irq1() == [0x58, 0xD8]
    booted.ps2ctr = CTR_AUXDIS | CTR_KBDINT  # translation off
    booted.i8042_command(I8042_CMD_CTL_WCTR, [booted.ps2ctr])
    booted.keys((XK_F12, True), (XK_F12, False))
    assert booted.drain_irq1() == [0x07, 0xF0, 0x07]


def test_every_key_translates_to_its_own_set_1_code() -> None:
    for key in KEYS:
        for down in (True, False):
            rig = Rig()
            rig.keyboard_setup()
            rig.kbc.keyboard.key(key, down)
            rig.kbc.input([])
            assert bytes(rig.drain_irq1()) == key.set1_bytes(down), key.name


def test_shifted_characters_name_the_same_key() -> None:
    assert KEYSYMS[ord("!")] is KEYSYMS[ord("1")]
    assert KEYSYMS[ord("A")] is KEYSYMS[ord("a")]
    assert KEYSYMS[ord("?")] is KEYSYMS[ord("/")]
    assert SET2_TO_SET1[0x83] == 0x41  # F7's odd set 2 code


def test_set_leds_and_scancode_set_queries(booted: Rig) -> None:
    booted.ps2_command(False, ATKBD_CMD_SETLEDS, [0x02])  # SeaBIOS set_leds: Num Lock
    assert booted.kbc.keyboard.leds == 0x02
    assert booted.ps2_command(False, ATKBD_CMD_GSCANSET, [0]) == [0x41]  # 2, translated
    assert booted.ps2_command(False, ATKBD_CMD_GETID) == [0xAB, 0x41]    # int 16h AH=0Ah
    booted.ps2ctr = CTR_AUXDIS | CTR_KBDINT
    booted.i8042_command(I8042_CMD_CTL_WCTR, [booted.ps2ctr])
    assert booted.ps2_command(False, ATKBD_CMD_GSCANSET, [0]) == [0x02]
    assert booted.ps2_command(False, ATKBD_CMD_GETID) == [0xAB, 0x83]


def test_scancode_set_1_without_translation(booted: Rig) -> None:
    booted.ps2_command(False, ATKBD_CMD_SSCANSET, [0x01])
    booted.ps2ctr = CTR_AUXDIS | CTR_KBDINT
    booted.i8042_command(I8042_CMD_CTL_WCTR, [booted.ps2ctr])
    booted.keys((XK_Up, True), (XK_Up, False))
    assert booted.drain_irq1() == [0xE0, 0x48, 0xE0, 0xC8]


def test_keys_are_dropped_while_scanning_is_off(booted: Rig) -> None:
    booted.ps2_command(False, ATKBD_CMD_RESET_DIS)
    assert booted.keys((XK_Escape, True)) == 0
    assert not booted.inb(STATUS) & OBF


def test_disabled_port_holds_keys_until_enabled(booted: Rig) -> None:
    booted.i8042_command(0x00AD)  # disable the keyboard interface
    booted.keys((XK_Escape, True))
    assert not booted.inb(STATUS) & OBF and not booted.level(1)
    booted.i8042_command(0x00AE)
    assert booted.drain_irq1() == [0x01]


def test_no_irq1_while_kbdint_is_clear_but_data_is_readable(booted: Rig) -> None:
    booted.i8042_command(I8042_CMD_CTL_WCTR, [CTR_XLATE])
    booted.keys((XK_Escape, True))
    assert not booted.level(1)
    assert booted.recvbyte(False, False) == 0x01


def test_queue_is_bounded_and_drops_whole_events(booted: Rig) -> None:
    booted.i8042_command(0x00AD)
    sent = booted.keys(*[(XK_Up, down) for _ in range(QUEUE_MAX) for down in (True, False)])
    assert sent < QUEUE_MAX and booted.kbc.keyboard.dropped > 0
    assert len(booted.kbc.keyboard.queue) <= QUEUE_MAX
    queued = bytes(booted.kbc.keyboard.queue)  # whole E0 75 / E0 F0 75 events only
    assert queued.replace(b"\xe0\xf0\x75", b"").replace(b"\xe0\x75", b"") == b""


def test_unknown_keysym_is_ignored(booted: Rig) -> None:
    assert booted.keys((0x1234567, True)) == 0
    assert not booted.inb(STATUS) & OBF


def test_reset_pulses_and_output_port(rig: Rig) -> None:
    rig.outb(STATUS, 0xFF)  # pulse nothing
    rig.outb(STATUS, 0xFD)  # pulse bit 1 (A20) only
    assert rig.resets == 0
    rig.outb(STATUS, 0xFE)
    assert rig.resets == 1
    assert rig.i8042_command(0x01D0)[0] & 0x03 == 0x03  # output port: reset and A20 high
    rig.i8042_command(0x10D1, [0xDF])  # A20 on, reset line high: nothing happens
    assert rig.resets == 1
    rig.i8042_command(0x10D1, [0xDE])  # bit 0 low: CPU reset
    assert rig.resets == 2


def test_absent_controller_reads_ff_and_only_resets() -> None:
    rig = Rig(present=False)
    assert rig.inb(STATUS) == 0xFF and rig.inb(DATA) == 0xFF
    rig.outb(STATUS, 0xAA)
    assert rig.inb(DATA) == 0xFF
    assert rig.kbc.input([KeyEvent(XK_Escape, True)]) == 0
    rig.outb(STATUS, 0xFE)
    assert rig.resets == 1


def test_linux_aux_loopback_and_irq12(rig: Rig) -> None:
    """Linux i8042_check_aux: AUX_LOOP (D3) echoes with the AUXDATA bit;
    with AUXINT set the byte raises IRQ 12."""
    rig.i8042_command(I8042_CMD_CTL_WCTR, [CTR_AUXINT | CTR_KBDDIS])
    rig.outb(STATUS, 0xD3)
    rig.outb(DATA, 0xA5)
    assert rig.inb(STATUS) & (OBF | AUXDATA) == OBF | AUXDATA
    assert rig.level(12) and not rig.level(1)
    assert rig.inb(DATA) == 0xA5
    assert not rig.level(12)


def test_mouse_reset_enable_and_packets(booted: Rig) -> None:
    assert booted.ps2_command(True, PSMOUSE_CMD_RESET_BAT) == [0xAA, 0x00]
    assert booted.ps2_command(True, PSMOUSE_CMD_GETID) == [0x00]
    booted.ps2_command(True, PSMOUSE_CMD_ENABLE)
    booted.ps2ctr = CTR_XLATE | CTR_KBDINT | CTR_AUXINT  # SeaBIOS after int 15h C200
    booted.i8042_command(I8042_CMD_CTL_WCTR, [booted.ps2ctr])
    booted.irqs.clear()
    booted.kbc.input([PointerEvent(100, 100, 0), PointerEvent(110, 90, 1)])
    assert booted.level(12)
    packet = [booted.recvbyte(True, False) for _ in range(3)]
    assert packet == [0x08 | 0x01, 10, 10]  # left button, right 10, up 10
    booted.kbc.input([PointerEvent(0, 400, 4)])  # far left and down, right button
    packets = []
    while booted.inb(STATUS) & OBF:
        packets.append(booted.recvbyte(True, False))
    assert packets[0] == 0x08 | 0x02 | 0x10 | 0x20  # right button, both signs
    heads = packets[0::3]
    dx = sum(b - (256 if h & 0x10 else 0) for h, b in zip(heads, packets[1::3], strict=True))
    dy = sum(b - (256 if h & 0x20 else 0) for h, b in zip(heads, packets[2::3], strict=True))
    assert (dx, dy) == (-110, -310)


def test_intellimouse_knock_adds_the_wheel_byte(booted: Rig) -> None:
    booted.ps2_command(True, PSMOUSE_CMD_RESET_BAT)
    for rate in (200, 100, 80):
        booted.ps2_command(True, PSMOUSE_CMD_SETRATE, [rate])
    assert booted.ps2_command(True, PSMOUSE_CMD_GETID) == [0x03]
    booted.ps2_command(True, PSMOUSE_CMD_ENABLE)
    booted.ps2ctr = CTR_KBDINT | CTR_AUXINT
    booted.i8042_command(I8042_CMD_CTL_WCTR, [booted.ps2ctr])
    booted.kbc.input([PointerEvent(5, 5, 0), PointerEvent(5, 5, 16)])  # wheel down
    assert [booted.recvbyte(True, False) for _ in range(4)] == [0x08, 0, 0, 1]


def test_mouse_disabled_sends_nothing(booted: Rig) -> None:
    booted.kbc.input([PointerEvent(1, 1, 0), PointerEvent(50, 50, 1)])
    assert not booted.inb(STATUS) & OBF


def test_machine_reset_restores_power_on_state(booted: Rig) -> None:
    booted.keys((XK_Shift_L, True))
    booted.kbc.reset()
    assert not booted.inb(STATUS) & (OBF | SYSFLAG)
    assert booted.i8042_command(I8042_CMD_CTL_RCTR) == [CTR_KBDINT | CTR_AUXINT]
    assert not booted.kbc.info()["translate"]


@pytest.mark.parametrize("events, message", [
    ({"type": "key"}, "list"),
    ([{"type": "key", "keysym": 65}], "down"),
    ([{"type": "key", "keysym": True, "down": True}], "keysym"),
    ([{"type": "key", "keysym": -1, "down": True}], "keysym"),
    ([{"type": "pointer", "x": 1, "y": 2}], "buttons"),
    ([{"type": "pointer", "x": 1 << 20, "y": 2, "buttons": 0}], "x"),
    ([{"type": "mouse"}], "type"),
    (["key"], "not a map"),
    ([{"type": "key", "keysym": 65, "down": True}] * 257, "at most"),
])
def test_hostile_input_events_are_refused(events: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_input_events(events)


def test_input_events_parse() -> None:
    assert parse_input_events([{"type": "key", "keysym": 0xFF1B, "down": True},
                               {"type": "pointer", "x": 3, "y": 4, "buttons": 9}]) == [
        KeyEvent(0xFF1B, True), PointerEvent(3, 4, 9)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([DATA, STATUS]), st.booleans(),
                          st.integers(0, 255)), max_size=80),
       st.lists(st.tuples(st.sampled_from([XK_Escape, XK_Up, ord("a"), 0]), st.booleans()),
                max_size=20))
def test_fuzz_never_raises_and_status_is_consistent(ops: list[tuple[int, bool, int]],
                                                    keys: list[tuple[int, bool]]) -> None:
    rig = Rig()
    for port, write, value in ops:
        if write:
            rig.outb(port, value)
        else:
            assert 0 <= rig.inb(port) <= 0xFF
        rig.keys(*keys[:2])
        status = rig.inb(STATUS)
        assert not status & 0x02  # IBF never stuck
        assert not rig.level(1) or (status & OBF and not status & AUXDATA)
        assert not rig.level(12) or status & (OBF | AUXDATA) == OBF | AUXDATA


def test_input_command_over_the_control_plane(tmp_path: Path, booted: Rig) -> None:
    """The display process's ``input`` command, through the core's real
    ``core.ctl`` endpoint, reaches the keyboard; bad events are refused
    with one line and change nothing."""
    supervisor = Supervisor(runtime_dir=str(tmp_path))
    control = CoreControl(supervisor, lambda: [], lambda: "running")
    endpoint = supervisor.control_endpoint("core")
    try:
        control.start()
        with pytest.raises(ControlError, match="no keyboard"):
            command(endpoint, "input", events=[])
        control.input = lambda events: booted.kbc.input(parse_input_events(events))
        reply = command(endpoint, "input", events=[
            {"type": "key", "keysym": XK_Escape, "down": True},
            {"type": "key", "keysym": XK_Escape, "down": False}])
        assert reply["delivered"] == 2
        assert booted.drain_irq1() == [0x01, 0x81]
        with pytest.raises(ControlError, match="event 0"):
            command(endpoint, "input", events=[{"type": "key", "keysym": "a"}])
        assert not booted.inb(STATUS) & OBF
    finally:
        control.close()
