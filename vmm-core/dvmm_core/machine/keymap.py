"""X11 keysyms to PC keyboard scancodes (sets 1 and 2), and the i8042's
set 2 -> set 1 translation.

Owns one table: every key of a US 104-key PC keyboard with its scancode in
set 1 (XT, what BIOSes and DOS read) and set 2 (AT, what a PS/2 keyboard
sends after reset), its ``E0`` prefix, and the X11 keysyms that name it.
The keysyms are those an RFB client sends (RFC 6143 section 7.5.4: X11
keysym values, ``/usr/include/X11/keysymdef.h``); a shifted character
(``!``, ``A``) names the same key as its unshifted one, because the client
sends the Shift key as an event of its own.

It does not own key state, queues or scancode-set selection: that is the
keyboard (``ps2.Ps2Keyboard``); nor the controller (``i8042``), which only
uses :data:`SET2_TO_SET1`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    """One physical key: its make codes (without the E0 prefix)."""

    name: str
    set1: int
    set2: int
    extended: bool = False

    def set2_bytes(self, down: bool) -> bytes:
        """Set 2: ``[E0] code`` to press, ``[E0] F0 code`` to release."""
        prefix = b"\xe0" if self.extended else b""
        return prefix + (b"" if down else b"\xf0") + bytes([self.set2])

    def set1_bytes(self, down: bool) -> bytes:
        """Set 1: ``[E0] code`` to press, ``[E0] code|0x80`` to release."""
        prefix = b"\xe0" if self.extended else b""
        return prefix + bytes([self.set1 if down else self.set1 | 0x80])


# (name, set 1, set 2, extended, keysyms).  Printable keys list their
# unshifted and shifted characters (keysym = Latin-1 code point).
_C = ord
_TABLE: tuple[tuple[str, int, int, bool, tuple[int, ...]], ...] = (
    ("Escape", 0x01, 0x76, False, (0xFF1B,)),
    ("1", 0x02, 0x16, False, (_C("1"), _C("!"))),
    ("2", 0x03, 0x1E, False, (_C("2"), _C("@"))),
    ("3", 0x04, 0x26, False, (_C("3"), _C("#"))),
    ("4", 0x05, 0x25, False, (_C("4"), _C("$"))),
    ("5", 0x06, 0x2E, False, (_C("5"), _C("%"))),
    ("6", 0x07, 0x36, False, (_C("6"), _C("^"))),
    ("7", 0x08, 0x3D, False, (_C("7"), _C("&"))),
    ("8", 0x09, 0x3E, False, (_C("8"), _C("*"))),
    ("9", 0x0A, 0x46, False, (_C("9"), _C("("))),
    ("0", 0x0B, 0x45, False, (_C("0"), _C(")"))),
    ("minus", 0x0C, 0x4E, False, (_C("-"), _C("_"))),
    ("equal", 0x0D, 0x55, False, (_C("="), _C("+"))),
    ("BackSpace", 0x0E, 0x66, False, (0xFF08,)),
    ("Tab", 0x0F, 0x0D, False, (0xFF09, 0xFE20)),  # ISO_Left_Tab = Shift-Tab
    ("q", 0x10, 0x15, False, ()), ("w", 0x11, 0x1D, False, ()),
    ("e", 0x12, 0x24, False, ()), ("r", 0x13, 0x2D, False, ()),
    ("t", 0x14, 0x2C, False, ()), ("y", 0x15, 0x35, False, ()),
    ("u", 0x16, 0x3C, False, ()), ("i", 0x17, 0x43, False, ()),
    ("o", 0x18, 0x44, False, ()), ("p", 0x19, 0x4D, False, ()),
    ("bracketleft", 0x1A, 0x54, False, (_C("["), _C("{"))),
    ("bracketright", 0x1B, 0x5B, False, (_C("]"), _C("}"))),
    ("Return", 0x1C, 0x5A, False, (0xFF0D,)),
    ("Control_L", 0x1D, 0x14, False, (0xFFE3,)),
    ("a", 0x1E, 0x1C, False, ()), ("s", 0x1F, 0x1B, False, ()),
    ("d", 0x20, 0x23, False, ()), ("f", 0x21, 0x2B, False, ()),
    ("g", 0x22, 0x34, False, ()), ("h", 0x23, 0x33, False, ()),
    ("j", 0x24, 0x3B, False, ()), ("k", 0x25, 0x42, False, ()),
    ("l", 0x26, 0x4B, False, ()),
    ("semicolon", 0x27, 0x4C, False, (_C(";"), _C(":"))),
    ("apostrophe", 0x28, 0x52, False, (_C("'"), _C('"'))),
    ("grave", 0x29, 0x0E, False, (_C("`"), _C("~"))),
    ("Shift_L", 0x2A, 0x12, False, (0xFFE1,)),
    ("backslash", 0x2B, 0x5D, False, (_C("\\"), _C("|"))),
    ("z", 0x2C, 0x1A, False, ()), ("x", 0x2D, 0x22, False, ()),
    ("c", 0x2E, 0x21, False, ()), ("v", 0x2F, 0x2A, False, ()),
    ("b", 0x30, 0x32, False, ()), ("n", 0x31, 0x31, False, ()),
    ("m", 0x32, 0x3A, False, ()),
    ("comma", 0x33, 0x41, False, (_C(","), _C("<"))),
    ("period", 0x34, 0x49, False, (_C("."), _C(">"))),
    ("slash", 0x35, 0x4A, False, (_C("/"), _C("?"))),
    ("Shift_R", 0x36, 0x59, False, (0xFFE2,)),
    ("KP_Multiply", 0x37, 0x7C, False, (0xFFAA,)),
    ("Alt_L", 0x38, 0x11, False, (0xFFE9, 0xFFE7)),  # Meta_L too
    ("space", 0x39, 0x29, False, (_C(" "),)),
    ("Caps_Lock", 0x3A, 0x58, False, (0xFFE5,)),
    ("F1", 0x3B, 0x05, False, (0xFFBE,)), ("F2", 0x3C, 0x06, False, (0xFFBF,)),
    ("F3", 0x3D, 0x04, False, (0xFFC0,)), ("F4", 0x3E, 0x0C, False, (0xFFC1,)),
    ("F5", 0x3F, 0x03, False, (0xFFC2,)), ("F6", 0x40, 0x0B, False, (0xFFC3,)),
    ("F7", 0x41, 0x83, False, (0xFFC4,)), ("F8", 0x42, 0x0A, False, (0xFFC5,)),
    ("F9", 0x43, 0x01, False, (0xFFC6,)), ("F10", 0x44, 0x09, False, (0xFFC7,)),
    ("Num_Lock", 0x45, 0x77, False, (0xFF7F,)),
    ("Scroll_Lock", 0x46, 0x7E, False, (0xFF14,)),
    ("KP_7", 0x47, 0x6C, False, (0xFFB7, 0xFF95)), ("KP_8", 0x48, 0x75, False, (0xFFB8, 0xFF97)),
    ("KP_9", 0x49, 0x7D, False, (0xFFB9, 0xFF9A)),
    ("KP_Subtract", 0x4A, 0x7B, False, (0xFFAD,)),
    ("KP_4", 0x4B, 0x6B, False, (0xFFB4, 0xFF96)), ("KP_5", 0x4C, 0x73, False, (0xFFB5, 0xFF9D)),
    ("KP_6", 0x4D, 0x74, False, (0xFFB6, 0xFF98)),
    ("KP_Add", 0x4E, 0x79, False, (0xFFAB,)),
    ("KP_1", 0x4F, 0x69, False, (0xFFB1, 0xFF9C)), ("KP_2", 0x50, 0x72, False, (0xFFB2, 0xFF99)),
    ("KP_3", 0x51, 0x7A, False, (0xFFB3, 0xFF9B)), ("KP_0", 0x52, 0x70, False, (0xFFB0, 0xFF9E)),
    ("KP_Decimal", 0x53, 0x71, False, (0xFFAE, 0xFF9F)),
    ("less", 0x56, 0x61, False, ()),  # the 102nd key (ISO); no US keysym of its own
    ("F11", 0x57, 0x78, False, (0xFFC8,)), ("F12", 0x58, 0x07, False, (0xFFC9,)),
    # E0-prefixed keys (the "grey" keys of the 101-key layout)
    ("KP_Enter", 0x1C, 0x5A, True, (0xFF8D,)),
    ("Control_R", 0x1D, 0x14, True, (0xFFE4,)),
    ("KP_Divide", 0x35, 0x4A, True, (0xFFAF,)),
    ("Alt_R", 0x38, 0x11, True, (0xFFEA, 0xFE03, 0xFFE8)),  # AltGr, Meta_R
    ("Home", 0x47, 0x6C, True, (0xFF50,)),
    ("Up", 0x48, 0x75, True, (0xFF52,)),
    ("Prior", 0x49, 0x7D, True, (0xFF55,)),
    ("Left", 0x4B, 0x6B, True, (0xFF51,)),
    ("Right", 0x4D, 0x74, True, (0xFF53,)),
    ("End", 0x4F, 0x69, True, (0xFF57,)),
    ("Down", 0x50, 0x72, True, (0xFF54,)),
    ("Next", 0x51, 0x7A, True, (0xFF56,)),
    ("Insert", 0x52, 0x70, True, (0xFF63,)),
    ("Delete", 0x53, 0x71, True, (0xFFFF,)),
    ("Super_L", 0x5B, 0x1F, True, (0xFFEB,)),
    ("Super_R", 0x5C, 0x27, True, (0xFFEC,)),
    ("Menu", 0x5D, 0x2F, True, (0xFF67,)),
)

KEYS: tuple[Key, ...] = tuple(Key(name, s1, s2, ext) for name, s1, s2, ext, _ in _TABLE)


def _keysyms() -> dict[int, Key]:
    table: dict[int, Key] = {}
    for key, (name, _s1, _s2, _ext, syms) in zip(KEYS, _TABLE, strict=True):
        if len(name) == 1 and name.isalpha():
            syms = (ord(name), ord(name.upper()))
        elif len(name) == 1:
            syms = (ord(name), *syms)
        for sym in syms:
            table.setdefault(sym, key)
    return table


#: keysym -> key.
KEYSYMS: dict[int, Key] = _keysyms()


def _translation() -> dict[int, int]:
    table = {key.set2: key.set1 for key in KEYS}
    # Not key codes, but a real 8042 translates these too: the answers to
    # "get scancode set" (F0 00) and the second byte of the keyboard ID.
    table.update({0x01: 0x43, 0x02: 0x41, 0x03: 0x3F})
    return table


#: The controller's set 2 -> set 1 translation for the bytes a keyboard
#: sends; other bytes (ACK FA, BAT AA, echo EE, E0) pass unchanged.  F0 is
#: not here: the controller swallows it and sets bit 7 of the next byte.
SET2_TO_SET1: dict[int, int] = _translation()


def key_for(keysym: int) -> Key | None:
    return KEYSYMS.get(keysym)
