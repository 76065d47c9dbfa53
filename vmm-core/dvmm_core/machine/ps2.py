"""The PS/2 keyboard and mouse behind the i8042 controller.

Owns each device's side of the PS/2 protocol: the command bytes the host
sends (through the controller) and the bytes the device queues in answer,
plus turning key and pointer events into the bytes a real device sends
(scancode set 2 from the keyboard, 3- or 4-byte movement packets from the
mouse).  Commands, answers and defaults follow the IBM PS/2 Technical
Reference ("Keyboard and Auxiliary Device Controller"), as QEMU's
``hw/input/ps2.c`` and Linux's ``atkbd.c``/``psmouse-base.c`` use them.

It does not own the controller (status, command byte, IRQs, set 2 -> set 1
translation: ``i8042``) nor the keysym table (``keymap``).  The queues are
bounded: a device whose host does not read drops new bytes, as a real one
whose buffer is full does.  Nothing here locks: the controller serialises
every call.
"""

from __future__ import annotations

from collections import deque

from .keymap import Key

ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA       # basic assurance test passed (after reset)
ECHO = 0xEE
KBD_ID = (0xAB, 0x83)  # MF2 keyboard
QUEUE_MAX = 256     # bytes; a full queue drops whole events, never half of one

# Keyboard commands (ATKBD_CMD_* in Linux)
KBD_SETLEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCANSET = 0xF0
KBD_GETID = 0xF2
KBD_SETREP = 0xF3
KBD_ENABLE = 0xF4
KBD_RESET_DIS = 0xF5
KBD_RESET_DEF = 0xF6
KBD_RESET = 0xFF

# Mouse commands (PSMOUSE_CMD_* in Linux)
AUX_SETSCALE11 = 0xE6
AUX_SETSCALE21 = 0xE7
AUX_SETRES = 0xE8
AUX_GETINFO = 0xE9
AUX_SETSTREAM = 0xEA
AUX_POLL = 0xEB
AUX_RESET_WRAP = 0xEC
AUX_SET_WRAP = 0xEE
AUX_SETREMOTE = 0xF0
AUX_GETID = 0xF2
AUX_SETRATE = 0xF3
AUX_ENABLE = 0xF4
AUX_DISABLE = 0xF5
AUX_RESET_DEF = 0xF6
AUX_RESET = 0xFF

#: The sample-rate sequence that turns a PS/2 mouse into an IntelliMouse
#: (ID 3, a fourth packet byte with the wheel), Microsoft's "knock".
INTELLIMOUSE_KNOCK = (200, 100, 80)


class Ps2Device:
    """A byte queue towards the controller, and the parameter byte a
    command may be waiting for."""

    def __init__(self) -> None:
        self.queue: deque[int] = deque()
        self._param_for: int | None = None  # the command awaiting a parameter
        self.dropped = 0

    def put(self, data: bytes | list[int]) -> bool:
        """Queue ``data`` whole, or not at all when the queue is full."""
        if len(self.queue) + len(data) > QUEUE_MAX:
            self.dropped += 1
            return False
        self.queue.extend(data)
        return True

    def pop(self) -> int | None:
        return self.queue.popleft() if self.queue else None

    def write(self, value: int) -> None:
        """A byte from the host (the controller forwards data-port writes)."""
        command, self._param_for = self._param_for, None
        if command is not None:
            self.parameter(command, value)
        else:
            self.command(value)

    def expect_parameter(self, command: int) -> None:
        self._param_for = command

    def command(self, value: int) -> None:
        raise NotImplementedError

    def parameter(self, command: int, value: int) -> None:
        raise NotImplementedError


class Ps2Keyboard(Ps2Device):
    """An MF2 keyboard: reset, LEDs, scancode sets 1 and 2 (3 is accepted
    and answered as 2), typematic rate (stored), enable/disable scanning."""

    def __init__(self) -> None:
        super().__init__()
        self.reset_state()

    def reset_state(self) -> None:
        self.scanning = True
        self.scancode_set = 2
        self.leds = 0
        self.typematic = 0x2B  # 10.9 cps, 500 ms: the power-on default

    def command(self, value: int) -> None:
        if value in (KBD_SETLEDS, KBD_SCANSET, KBD_SETREP):
            self.put([ACK])
            self.expect_parameter(value)
        elif value == KBD_ECHO:
            self.put([ECHO])
        elif value == KBD_GETID:
            self.put([ACK, *KBD_ID])
        elif value == KBD_ENABLE:
            self.queue.clear()  # enabling clears the output buffer (IBM TR)
            self.scanning = True
            self.put([ACK])
        elif value in (KBD_RESET_DIS, KBD_RESET_DEF):
            self.reset_state()
            self.scanning = value == KBD_RESET_DEF
            self.queue.clear()
            self.put([ACK])
        elif value == KBD_RESET:
            self.reset_state()
            self.queue.clear()
            self.put([ACK, BAT_OK])
        elif value in (0xEF, 0xF1) or value < 0xED:
            self.put([RESEND])  # not a command: the keyboard asks again
        else:
            self.put([ACK])      # set-3 key-type commands (F7-FD): accepted, ignored

    def parameter(self, command: int, value: int) -> None:
        if command == KBD_SETLEDS:
            self.leds = value & 0x07
        elif command == KBD_SETREP:
            self.typematic = value & 0x7F
        elif value == 0:  # KBD_SCANSET 0: report the current set after the ACK
            self.put([ACK, self.scancode_set])
            return
        elif 1 <= value <= 3:
            self.scancode_set = value
        else:
            self.put([RESEND])
            return
        self.put([ACK])

    def key(self, key: Key, down: bool) -> bool:
        """A key went down or up; False if it was not queued (scanning off,
        or the buffer is full)."""
        if not self.scanning:
            return False
        data = key.set1_bytes(down) if self.scancode_set == 1 else key.set2_bytes(down)
        return self.put(data)


class Ps2Mouse(Ps2Device):
    """A PS/2 mouse in stream mode (remote mode and wrap mode too), with the
    IntelliMouse wheel extension."""

    def __init__(self) -> None:
        super().__init__()
        self.reset_state()
        self.buttons = 0

    def reset_state(self) -> None:
        self.enabled = False  # data reporting: off after reset
        self.remote = False
        self.wrap = False
        self.scale21 = False
        self.resolution = 2   # 4 counts/mm
        self.rate = 100
        self.mouse_id = 0
        self._rates: list[int] = []
        self._dx = self._dy = self._dz = 0

    def command(self, value: int) -> None:
        if self.wrap and value not in (AUX_RESET_WRAP, AUX_RESET):
            self.put([value])  # wrap mode echoes every byte
            return
        simple = {AUX_SETSCALE11: ("scale21", False), AUX_SETSCALE21: ("scale21", True),
                  AUX_SETSTREAM: ("remote", False), AUX_SETREMOTE: ("remote", True),
                  AUX_SET_WRAP: ("wrap", True), AUX_RESET_WRAP: ("wrap", False),
                  AUX_ENABLE: ("enabled", True), AUX_DISABLE: ("enabled", False)}
        if value in simple:
            attr, state = simple[value]
            setattr(self, attr, state)
            self.put([ACK])
        elif value in (AUX_SETRES, AUX_SETRATE):
            self.put([ACK])
            self.expect_parameter(value)
        elif value == AUX_GETINFO:
            status = (self.remote << 6 | self.enabled << 5 | self.scale21 << 4
                      | (self.buttons & 1) << 2 | (self.buttons & 2) >> 1
                      | (self.buttons & 4) >> 1)
            self.put([ACK, status, self.resolution, self.rate])
        elif value == AUX_GETID:
            self.put([ACK, self.mouse_id])
        elif value == AUX_POLL:
            self.put([ACK])
            self._send_packet()
        elif value == AUX_RESET_DEF:
            self.reset_state()
            self.put([ACK])
        elif value == AUX_RESET:
            self.reset_state()
            self.queue.clear()
            self.put([ACK, BAT_OK, self.mouse_id])
        else:
            self.put([RESEND])

    def parameter(self, command: int, value: int) -> None:
        if command == AUX_SETRES:
            self.resolution = value & 0x03
        else:
            self.rate = value
            self._rates = [*self._rates, value][-len(INTELLIMOUSE_KNOCK):]
            if tuple(self._rates) == INTELLIMOUSE_KNOCK:
                self.mouse_id = 3
        self.put([ACK])

    def motion(self, dx: int, dy: int, dz: int, buttons: int) -> None:
        """Relative motion (dy positive = up, as PS/2 counts it), wheel
        clicks (dz positive = towards the user) and the buttons now held
        (bit 0 left, 1 right, 2 middle).  Sent in stream mode when
        reporting is on; remembered for a poll in remote mode."""
        changed = buttons != self.buttons
        self.buttons = buttons & 0x07
        self._dx += dx
        self._dy += dy
        self._dz += dz if self.mouse_id == 3 else 0
        if not self.enabled or self.remote:
            return
        if not (changed or self._dx or self._dy or self._dz):
            return
        while self._send_packet() and (self._dx or self._dy or self._dz):
            pass

    def _send_packet(self) -> bool:
        """One packet of at most +-255 counts per axis (the 9-bit range of
        the sign bits); returns False when the queue is full."""
        dx, dy = _clamp(self._dx, 255), _clamp(self._dy, 255)
        dz = _clamp(self._dz, 7)
        head = (0x08 | self.buttons | (dx < 0) << 4 | (dy < 0) << 5)
        packet = [head, dx & 0xFF, dy & 0xFF]
        if self.mouse_id == 3:
            packet.append(dz & 0xFF)
        if not self.put(packet):
            self._dx = self._dy = self._dz = 0  # stale motion is not worth queueing
            return False
        self._dx, self._dy, self._dz = self._dx - dx, self._dy - dy, self._dz - dz
        return True


def _clamp(value: int, limit: int) -> int:
    return max(-limit, min(limit, value))
