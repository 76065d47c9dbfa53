"""The i8042 keyboard controller (ports 0x60/0x64), its reset line, and
the input events that reach its keyboard and mouse.

Owns the controller: the status register, the command byte (controller
RAM byte 0), the controller commands SeaBIOS, Linux and boot loaders use
(self-test AA -> 55, interface tests AB/A9 -> 00, read/write command byte
20/60, enable/disable the ports AD/AE/A7/A8, output port D0/D1, write an
output buffer D2/D3, send to the mouse D4, pulse the reset line F0-FF),
the one-byte output buffer with its IRQ 1 / IRQ 12 lines, and the set 2 ->
set 1 translation of keyboard bytes while the command byte's XLATE bit is
set (as the real chip does).  References: IBM PS/2 Technical Reference
"Keyboard/Auxiliary Device Controller"; SeaBIOS ``src/hw/ps2port.c``
(the sequences it sends); QEMU ``hw/input/pckbd.c`` (IRQ levels).

It also owns :func:`parse_input_events`: the display process's ``input``
command (``notes/display_interface.md``) is hostile input; events become
:class:`KeyEvent`/:class:`PointerEvent` or :class:`InputError`.

Without a keyboard (``present=False``, a machine with no display) the
controller is reduced to its reset line and both ports read 0xFF: SeaBIOS's
``i8042_flush`` then sees the output buffer stuck full and gives up the
keyboard probe at once (a status of 0 would cost ~0.9 s of command
timeouts, notes/seabios.md section 2), and Linux reports "No controller
found".  Linux ``reboot=k`` polls bit 1 (input buffer full) up to 64 K times
before writing 0xFE anyway, and writes it ten times, so ``on_reset`` may be
called more than once per reboot.

Devices (``ps2``) and the controller are called from vCPU threads (port
I/O) and from the control thread (input events): one lock serialises them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag
from typing import Any, TypeGuard

from .bus import Bus
from .keymap import SET2_TO_SET1, key_for
from .platform import ByteDevice, LogOnce, PortWindow
from .ps2 import Ps2Keyboard, Ps2Mouse

log = logging.getLogger("dvmm.i8042")

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
_CMD_OFFSET = I8042_COMMAND_PORT - I8042_DATA_PORT
KBD_GSI, AUX_GSI = 1, 12
MAX_EVENTS = 256  # per input command


class Status(IntFlag):
    OBF = 0x01       # output buffer full
    IBF = 0x02       # input buffer full (never: writes complete at once)
    SYSFLAG = 0x04   # set by a passed self-test
    CMD = 0x08       # the last write went to the command port
    UNLOCKED = 0x10  # keyboard not inhibited by the key lock
    AUXDATA = 0x20   # the output buffer holds mouse data


class Ctr(IntFlag):
    """The command byte (controller configuration, RAM byte 0)."""

    KBDINT = 0x01
    AUXINT = 0x02
    SYSFLAG = 0x04
    IGNKEYLOCK = 0x08
    KBDDIS = 0x10
    AUXDIS = 0x20
    XLATE = 0x40


# Controller commands (port 0x64)
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT = 0xC0
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_READ_TEST = 0xE0
CMD_PULSE_BASE = 0xF0  # F0-FF: pulse output port bits 0-3 where the command bit is 0
CMD_PULSE_RESET = 0xFE  # pulse bit 0 (CPU reset); Linux reboot=k, SeaBIOS i8042_reboot
_WITH_PARAMETER = (CMD_WRITE_CTR, CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF,
                   CMD_WRITE_AUX)

OUT_RESET = 0x01  # output port bit 0: 0 = hold the CPU in reset
OUT_A20 = 0x02
_OUT_DEFAULT = 0xCF  # reset and A20 high, plus the bits QEMU keeps set
SELF_TEST_OK = 0x55
RFB_BUTTONS = {1: 0x01, 2: 0x04, 4: 0x02}  # RFB left/middle/right -> PS/2 bits
WHEEL_UP, WHEEL_DOWN = 8, 16


class InputError(ValueError):
    """An input event that is not well formed."""


@dataclass(frozen=True)
class KeyEvent:
    keysym: int
    down: bool


@dataclass(frozen=True)
class PointerEvent:
    x: int
    y: int
    buttons: int  # RFB mask: 1 left, 2 middle, 4 right, 8 wheel up, 16 wheel down


InputEvent = KeyEvent | PointerEvent


def parse_input_events(events: Any) -> list[InputEvent]:
    """The ``events`` of an ``input`` command, checked."""
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise InputError(f"'events' must be a list of at most {MAX_EVENTS} maps")
    return [_parse_event(i, e) for i, e in enumerate(events)]


def _parse_event(index: int, event: Any) -> InputEvent:
    if not isinstance(event, dict):
        raise InputError(f"event {index} is not a map")
    kind = event.get("type")
    if kind == "key":
        sym, down = event.get("keysym"), event.get("down")
        if _is_int(sym, 0, 0xFFFFFFFF) and isinstance(down, bool):
            return KeyEvent(sym, down)
        raise InputError(f"event {index}: a key needs 'keysym' (u32) and 'down' (bool)")
    if kind == "pointer":
        x, y, buttons = event.get("x"), event.get("y"), event.get("buttons")
        if _is_int(x, 0, 0xFFFF) and _is_int(y, 0, 0xFFFF) and _is_int(buttons, 0, 0xFF):
            return PointerEvent(x, y, buttons)
        raise InputError(f"event {index}: a pointer needs 'x', 'y' (u16) and 'buttons' (u8)")
    raise InputError(f"event {index}: 'type' must be 'key' or 'pointer'")


def _is_int(value: Any, low: int, high: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class I8042(ByteDevice):
    """The controller.  Offsets are relative to 0x60: 0 data, 4 command/status.

    ``irq(gsi, level)`` drives IRQ 1 and IRQ 12 as levels (QEMU's model: the
    line is high while the output buffer holds data for an enabled
    interrupt); the PIC sees an edge when a read empties the buffer and the
    next byte refills it."""

    length = 5

    def __init__(self, on_reset: Callable[[], None],
                 irq: Callable[[int, bool], None] | None = None, *, present: bool = True) -> None:
        self._on_reset = on_reset
        self._irq = irq or (lambda gsi, level: None)
        self.present = present
        self.keyboard = Ps2Keyboard()
        self.mouse = Ps2Mouse()
        self._lock = threading.RLock()
        self._warn = LogOnce(log)
        self._last_pointer: tuple[int, int] | None = None
        self.reset()

    def reset(self) -> None:
        """Power-on state (QEMU's kbd_reset), devices included."""
        with self._lock:
            self.ctr = Ctr.KBDINT | Ctr.AUXINT
            self.status = Status.CMD | Status.UNLOCKED
            self.outport = _OUT_DEFAULT
            self._pending: int | None = None  # a command awaiting its data byte
            self._ctl: deque[tuple[int, bool]] = deque()  # controller output: (byte, aux)
            self._out: int | None = None
            self._out_aux = False
            self._last = 0
            self._break = False  # translation: an F0 was swallowed
            self._levels = (False, False)
            self.keyboard = Ps2Keyboard()
            self.mouse = Ps2Mouse()
            self._last_pointer = None
            self._update()

    # -- port access (vCPU threads) ---------------------------------------------
    def read_byte(self, offset: int) -> int:
        if not self.present:
            return 0xFF
        with self._lock:
            if offset == _CMD_OFFSET:
                return self._status()
            if offset != 0:
                return 0xFF
            if self._out is not None:
                self._last, self._out = self._out, None
                self._lower()  # a read drops the line; a refill raises it again: an edge
                self._update()
            return self._last

    def write_byte(self, offset: int, value: int) -> None:
        if not self.present:
            if offset == _CMD_OFFSET and value == CMD_PULSE_RESET:
                self._on_reset()
            return
        with self._lock:
            if offset == _CMD_OFFSET:
                self.status |= Status.CMD
                reset = self._command(value)
            elif offset == 0:
                self.status &= ~Status.CMD
                reset = self._data(value)
            else:
                return
            self._update()
        if reset:
            self._on_reset()  # outside the lock: the machine stops this vCPU

    def register(self, bus: Bus) -> None:
        """Claim 0x60 and 0x64 only: 0x61 belongs to the (in-kernel) PIT speaker."""
        bus.register(I8042_DATA_PORT, 1, PortWindow(self, 0), "i8042-data")
        bus.register(I8042_COMMAND_PORT, 1, PortWindow(self, _CMD_OFFSET), "i8042-cmd")

    def _status(self) -> int:
        value = self.status & ~(Status.OBF | Status.AUXDATA)
        if self._out is not None:
            value |= Status.OBF | (Status.AUXDATA if self._out_aux else 0)
        return int(value)

    # -- controller commands --------------------------------------------------------
    def _command(self, value: int) -> bool:
        """A controller command; True when it resets the machine."""
        self._pending = None
        if value >= CMD_PULSE_BASE:
            return not value & OUT_RESET  # bit 0 low pulses the CPU reset line
        if value in _WITH_PARAMETER:
            self._pending = value
        elif value == CMD_READ_CTR:
            self._reply(int(self.ctr))
        elif value in (CMD_KBD_DISABLE, CMD_KBD_ENABLE):
            self._set_ctr(Ctr.KBDDIS, value == CMD_KBD_DISABLE)
        elif value in (CMD_AUX_DISABLE, CMD_AUX_ENABLE):
            self._set_ctr(Ctr.AUXDIS, value == CMD_AUX_DISABLE)
        elif value == CMD_SELF_TEST:
            self.status |= Status.SYSFLAG
            self._reply(SELF_TEST_OK)
        elif value in (CMD_KBD_TEST, CMD_AUX_TEST, CMD_READ_TEST):
            self._reply(0x00)  # interface tests: no error
        elif value == CMD_READ_INPUT:
            self._reply(0x80)  # keyboard not inhibited
        elif value == CMD_READ_OUTPUT:
            self._reply(self.outport)
        else:
            self._warn.warn(("cmd", value), "i8042: unsupported controller command %#x", value)
        return False

    def _data(self, value: int) -> bool:
        """A data-port write: a pending command's parameter, or a byte for
        the keyboard."""
        command, self._pending = self._pending, None
        if command == CMD_WRITE_CTR:
            self.ctr = Ctr(value & 0x7F)  # bit 7 is reserved (reads 0)
        elif command == CMD_WRITE_OUTPUT:
            self.outport = value
            return not value & OUT_RESET
        elif command in (CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF):
            self._ctl.append((value, command == CMD_WRITE_AUX_OBUF))
        elif command == CMD_WRITE_AUX:
            self.mouse.write(value)
        else:
            self.keyboard.write(value)
        return False

    def _set_ctr(self, bit: Ctr, on: bool) -> None:
        self.ctr = self.ctr | bit if on else self.ctr & ~bit

    def _reply(self, value: int) -> None:
        self._ctl.append((value, False))

    # -- the output buffer -------------------------------------------------------
    def _update(self) -> None:
        """(lock held) Refill the output buffer, then set both IRQ lines."""
        if self._out is None:
            self._fill()
        full = self._out is not None
        kbd = full and not self._out_aux and bool(self.ctr & Ctr.KBDINT) and not (
            self.ctr & Ctr.KBDDIS)
        aux = full and self._out_aux and bool(self.ctr & Ctr.AUXINT)
        for gsi, old, new in ((KBD_GSI, self._levels[0], kbd), (AUX_GSI, self._levels[1], aux)):
            if old != new:
                self._irq(gsi, new)
        self._levels = (kbd, aux)

    def _lower(self) -> None:
        for gsi, level in zip((KBD_GSI, AUX_GSI), self._levels, strict=True):
            if level:
                self._irq(gsi, False)
        self._levels = (False, False)

    def _fill(self) -> None:
        """Controller answers first, then the keyboard, then the mouse;
        a disabled port keeps its device's bytes waiting."""
        if self._ctl:
            self._out, self._out_aux = self._ctl.popleft()
            return
        if not self.ctr & Ctr.KBDDIS:
            while (byte := self.keyboard.pop()) is not None:
                translated = self._translate(byte)
                if translated is not None:
                    self._out, self._out_aux = translated, False
                    return
        if not self.ctr & Ctr.AUXDIS and (byte := self.mouse.pop()) is not None:
            self._out, self._out_aux = byte, True

    def _translate(self, byte: int) -> int | None:
        """Set 2 -> set 1 while XLATE is on: F0 is swallowed and sets bit 7
        of the next byte; None when the byte produced no output."""
        if not self.ctr & Ctr.XLATE:
            return byte
        if byte == 0xF0:
            self._break = True
            return None
        value = SET2_TO_SET1.get(byte, byte)
        if self._break:
            self._break = False
            value |= 0x80
        return value

    # -- input from the display (control thread) -----------------------------------
    def input(self, events: list[InputEvent]) -> int:
        """Queue key and pointer events; returns how many reached a device
        (keys without a scancode, or sent while scanning is off, do not)."""
        if not self.present:
            return 0
        delivered = 0
        with self._lock:
            for event in events:
                if isinstance(event, KeyEvent):
                    delivered += self._key(event)
                else:
                    delivered += self._pointer(event)
            self._update()
        return delivered

    def _key(self, event: KeyEvent) -> bool:
        key = key_for(event.keysym)
        if key is None:
            self._warn.warn(("keysym", event.keysym), "i8042: no scancode for keysym %#x",
                            event.keysym)
            return False
        return self.keyboard.key(key, event.down)

    def _pointer(self, event: PointerEvent) -> bool:
        """RFB gives absolute positions; a PS/2 mouse reports motion (y up)."""
        last = self._last_pointer or (event.x, event.y)
        self._last_pointer = (event.x, event.y)
        dz = (1 if event.buttons & WHEEL_DOWN else 0) - (1 if event.buttons & WHEEL_UP else 0)
        buttons = sum(bit for rfb, bit in RFB_BUTTONS.items() if event.buttons & rfb)
        before = len(self.mouse.queue)
        self.mouse.motion(event.x - last[0], last[1] - event.y, dz, buttons)
        return len(self.mouse.queue) > before

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"present": self.present, "ctr": int(self.ctr),
                    "translate": bool(self.ctr & Ctr.XLATE),
                    "scanning": self.keyboard.scanning,
                    "scancode_set": self.keyboard.scancode_set, "leds": self.keyboard.leds,
                    "mouse_enabled": self.mouse.enabled, "queued": len(self.keyboard.queue)}
