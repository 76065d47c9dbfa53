"""virtio-input's wire format and what a VNC client's input becomes in it: pure.

Owns the numbers of virtio 1.2 section 5.8 "Input Device" (config selects,
``struct virtio_input_config``, ``struct virtio_input_event``) and of the
Linux evdev interface they carry (``EV_*``, ``KEY_*``, ``BTN_*``,
``ABS_*``: ``include/uapi/linux/input-event-codes.h``, which 5.8.6 says the
event values follow); the description of the two devices the display
process serves (a keyboard and an absolute-pointer tablet: their ID_NAME,
ID_DEVIDS, EV_BITS and ABS_INFO config items, 5.8.4); and turning RFB
input (X11 keysyms, RFC 6143 7.5.4; pointer position and button mask,
7.5.5) into evdev events, each group closed by ``SYN_REPORT`` as 5.8.6.1
asks.  Queues and threads are :mod:`.input_device`'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

# struct virtio_input_event {le16 type; le16 code; le32 value;} (5.8.6)
EVENT = struct.Struct("<HHi")
# struct virtio_input_config {u8 select; u8 subsel; u8 size; u8 reserved[5];
#                             union {...} u[128];} (5.8.4)
CONFIG_HEADER = struct.Struct("<BBB5x")
CONFIG_UNION = 128
CONFIG_SIZE = CONFIG_HEADER.size + CONFIG_UNION
# struct virtio_input_absinfo {le32 min, max, fuzz, flat, res;}
ABSINFO = struct.Struct("<iiiii")
# struct virtio_input_devids {le16 bustype, vendor, product, version;}
DEVIDS = struct.Struct("<HHHH")


class CfgSelect(IntEnum):
    """enum virtio_input_config_select (5.8.4)."""

    UNSET = 0x00
    ID_NAME = 0x01
    ID_SERIAL = 0x02
    ID_DEVIDS = 0x03
    PROP_BITS = 0x10
    EV_BITS = 0x11
    ABS_INFO = 0x12


# Linux input-event-codes.h
EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_MSC, EV_LED, EV_REP = 0x00, 0x01, 0x02, 0x03, 0x04, 0x11, 0x14
SYN_REPORT = 0
REL_WHEEL = 0x08
ABS_X, ABS_Y = 0x00, 0x01
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
LED_NUML, LED_CAPSL, LED_SCROLLL = 0x00, 0x01, 0x02
BUS_VIRTUAL = 0x06
KEY_MAX = 0x2FF
#: The tablet's coordinate range, as QEMU's virtio tablet: 0..32767 on both
#: axes whatever the screen size (the guest scales to its own mode).
ABS_MAX = 0x7FFF

# -- X11 keysyms -> Linux KEY_* codes ---------------------------------------------------
# The main block, row by row: (first KEY_ code, unshifted characters, shifted
# ones).  A client sends Shift as a key of its own, so "A" and "a" are one key.
_ROWS = (
    (2, "1234567890-=", "!@#$%^&*()_+"),
    (16, "qwertyuiop[]", "QWERTYUIOP{}"),
    (30, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
    (43, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
)
_SPECIAL: dict[int, int] = {
    0xFF1B: 1,    # Escape
    0xFF08: 14,   # BackSpace
    0xFF09: 15, 0xFE20: 15,  # Tab, ISO_Left_Tab (Shift-Tab)
    0xFF0D: 28,   # Return
    0xFFE3: 29,   # Control_L
    0xFFE1: 42,   # Shift_L
    0xFFE2: 54,   # Shift_R
    0xFFAA: 55,   # KP_Multiply
    0xFFE9: 56, 0xFFE7: 56,  # Alt_L, Meta_L
    0x0020: 57,   # space
    0xFFE5: 58,   # Caps_Lock
    0xFF7F: 69,   # Num_Lock
    0xFF14: 70,   # Scroll_Lock
    0xFFB7: 71, 0xFF95: 71, 0xFFB8: 72, 0xFF97: 72, 0xFFB9: 73, 0xFF9A: 73,  # KP_7..9
    0xFFAD: 74,   # KP_Subtract
    0xFFB4: 75, 0xFF96: 75, 0xFFB5: 76, 0xFF9D: 76, 0xFFB6: 77, 0xFF98: 77,  # KP_4..6
    0xFFAB: 78,   # KP_Add
    0xFFB1: 79, 0xFF9C: 79, 0xFFB2: 80, 0xFF99: 80, 0xFFB3: 81, 0xFF9B: 81,  # KP_1..3
    0xFFB0: 82, 0xFF9E: 82,  # KP_0
    0xFFAE: 83, 0xFF9F: 83,  # KP_Decimal
    0xFFC8: 87, 0xFFC9: 88,  # F11, F12
    0xFF8D: 96,   # KP_Enter
    0xFFE4: 97,   # Control_R
    0xFFAF: 98,   # KP_Divide
    0xFF61: 99,   # Print (KEY_SYSRQ)
    0xFFEA: 100, 0xFE03: 100, 0xFFE8: 100,  # Alt_R, ISO_Level3_Shift (AltGr), Meta_R
    0xFF50: 102, 0xFF52: 103, 0xFF55: 104,  # Home, Up, Prior
    0xFF51: 105, 0xFF53: 106,  # Left, Right
    0xFF57: 107, 0xFF54: 108, 0xFF56: 109,  # End, Down, Next
    0xFF63: 110, 0xFFFF: 111,  # Insert, Delete
    0xFF13: 119,  # Pause
    0xFFEB: 125, 0xFFEC: 126,  # Super_L, Super_R
    0xFF67: 127,  # Menu (KEY_COMPOSE)
}


def _keysym_table() -> dict[int, int]:
    table = dict(_SPECIAL)
    for first, plain, shifted in _ROWS:
        for i, (a, b) in enumerate(zip(plain, shifted, strict=True)):
            table[ord(a)] = table[ord(b)] = first + i
    for i in range(10):  # F1..F10 are KEY_F1 (59)..KEY_F10 (68)
        table[0xFFBE + i] = 59 + i
    return table


#: X11 keysym -> Linux KEY_* code (US layout).
KEYSYM_TO_KEY: dict[int, int] = _keysym_table()


def key_code(keysym: int) -> int | None:
    return KEYSYM_TO_KEY.get(keysym)


# -- events ------------------------------------------------------------------------------
def event(type_: int, code: int, value: int) -> bytes:
    return EVENT.pack(type_, code, value)


SYN = event(EV_SYN, SYN_REPORT, 0)


def parse_event(data: bytes) -> tuple[int, int, int]:
    """A driver's status-queue event (5.8.6.2); ValueError when too short."""
    if len(data) < EVENT.size:
        raise ValueError(f"{len(data)}-byte event, need {EVENT.size}")
    t, c, v = EVENT.unpack_from(data)
    return t, c, v


@dataclass
class KeyboardState:
    """Which keys are down: a repeated press is evdev's autorepeat (value 2)."""

    down: set[int] = field(default_factory=set)

    def key(self, keysym: int, pressed: bool) -> list[bytes]:
        """The events for one RFB KeyEvent; [] for an unknown keysym or the
        release of a key that is not down."""
        code = key_code(keysym)
        if code is None:
            return []
        if pressed:
            value = 2 if code in self.down else 1
            self.down.add(code)
        elif code in self.down:
            self.down.discard(code)
            value = 0
        else:
            return []
        return [event(EV_KEY, code, value), SYN]

    def release_all(self) -> list[bytes]:
        """Releases for every key still down (the client left mid-press)."""
        out = [event(EV_KEY, code, 0) for code in sorted(self.down)]
        self.down.clear()
        return [*out, SYN] if out else []


#: RFB button-mask bits (7.5.5) -> BTN_* codes; bits 3 and 4 are the wheel.
_BUTTONS = ((1, BTN_LEFT), (2, BTN_MIDDLE), (4, BTN_RIGHT))
WHEEL_UP, WHEEL_DOWN = 8, 16


def scale(pos: int, extent: int) -> int:
    """A pixel position on a screen ``extent`` pixels wide to 0..ABS_MAX."""
    if extent <= 1:
        return 0
    return min(max(pos, 0), extent - 1) * ABS_MAX // (extent - 1)


@dataclass
class TabletState:
    """The button mask last sent, so only changes become BTN events."""

    buttons: int = 0

    def pointer(self, x: int, y: int, buttons: int, screen: tuple[int, int]) -> list[bytes]:
        """The events for one RFB PointerEvent on a ``screen`` (width, height)."""
        out = [event(EV_ABS, ABS_X, scale(x, screen[0])),
               event(EV_ABS, ABS_Y, scale(y, screen[1]))]
        changed = buttons ^ self.buttons
        for bit, code in _BUTTONS:
            if changed & bit:
                out.append(event(EV_KEY, code, 1 if buttons & bit else 0))
        pressed = changed & buttons
        if pressed & WHEEL_UP:  # a wheel "button" press is one detent
            out.append(event(EV_REL, REL_WHEEL, 1))
        if pressed & WHEEL_DOWN:
            out.append(event(EV_REL, REL_WHEEL, -1))
        self.buttons = buttons & 0xFF
        out.append(SYN)
        return out


# -- config space (5.8.4) -----------------------------------------------------------------
def bitmap(bits: list[int] | range | set[int]) -> bytes:
    """A little-endian bitmap of ``bits`` (byte i bit j = number 8i+j), trimmed."""
    size = max(bits) // 8 + 1 if bits else 0
    out = bytearray(size)
    for b in bits:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out)


@dataclass(frozen=True)
class InputSpec:
    """What one virtio-input device says it is: its config items by
    (select, subsel), each the payload of the ``u`` union."""

    kind: str
    items: dict[tuple[int, int], bytes]

    def config(self, select: int, subsel: int) -> bytes:
        """The whole ``virtio_input_config`` for a selection (size 0 when the
        device has nothing there, as 5.8.5.1 asks)."""
        payload = self.items.get((select, subsel), b"")
        return CONFIG_HEADER.pack(select, subsel, len(payload)) + payload.ljust(CONFIG_UNION,
                                                                                 b"\0")


def _spec(kind: str, name: str, product: int, bits: dict[int, bytes],
          extra: dict[tuple[int, int], bytes]) -> InputSpec:
    items: dict[tuple[int, int], bytes] = {
        (CfgSelect.ID_NAME, 0): name.encode(),
        (CfgSelect.ID_SERIAL, 0): f"dvmm-{kind}".encode(),
        (CfgSelect.ID_DEVIDS, 0): DEVIDS.pack(BUS_VIRTUAL, 0x1AF4, product, 1),
    }
    items.update({(CfgSelect.EV_BITS, ev): data for ev, data in bits.items()})
    items.update(extra)
    for (_sel, _sub), payload in items.items():
        assert len(payload) <= CONFIG_UNION
    return InputSpec(kind, items)


def keyboard_spec() -> InputSpec:
    """A keyboard with every key the keysym table reaches, its LEDs, and
    EV_REP (an empty bitmap of size 1: Linux then repeats in software)."""
    return _spec("keyboard", "dvmm virtio keyboard", 1, {
        EV_KEY: bitmap(set(KEYSYM_TO_KEY.values())),
        EV_LED: bitmap([LED_NUML, LED_CAPSL, LED_SCROLLL]),
        EV_REP: b"\0",
    }, {})


def tablet_spec() -> InputSpec:
    """An absolute pointer (ABS_X/ABS_Y 0..ABS_MAX), three buttons and a wheel."""
    absinfo = ABSINFO.pack(0, ABS_MAX, 0, 0, 0)
    return _spec("tablet", "dvmm virtio tablet", 2, {
        EV_KEY: bitmap([BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]),
        EV_REL: bitmap([REL_WHEEL]),
        EV_ABS: bitmap([ABS_X, ABS_Y]),
    }, {(CfgSelect.ABS_INFO, ABS_X): absinfo, (CfgSelect.ABS_INFO, ABS_Y): absinfo})
