"""virtio-input's pure parts (:mod:`dvmm_display.evdev`) against virtio 1.2
section 5.8 and Linux's input-event-codes.h."""

from __future__ import annotations

import struct

from dvmm_display.evdev import (
    ABS_MAX,
    ABS_X,
    ABS_Y,
    BTN_LEFT,
    BTN_RIGHT,
    BUS_VIRTUAL,
    CONFIG_SIZE,
    EV_ABS,
    EV_KEY,
    EV_REL,
    EV_REP,
    EV_SYN,
    EVENT,
    REL_WHEEL,
    CfgSelect,
    KeyboardState,
    TabletState,
    bitmap,
    key_code,
    keyboard_spec,
    parse_event,
    scale,
    tablet_spec,
)
from hypothesis import given
from hypothesis import strategies as st

# A few codes from include/uapi/linux/input-event-codes.h, spelled out.
KEY_ESC, KEY_A, KEY_Z, KEY_ENTER, KEY_LEFTSHIFT, KEY_F1, KEY_F12 = 1, 30, 44, 28, 42, 59, 88
KEY_UP, KEY_DELETE, KEY_KPENTER, KEY_RIGHTALT, KEY_SPACE = 103, 111, 96, 100, 57


def events(data: list[bytes]) -> list[tuple[int, int, int]]:
    return [EVENT.unpack(e) for e in data]


def test_keysyms_map_to_linux_key_codes() -> None:
    assert key_code(0xFF1B) == KEY_ESC
    assert key_code(ord("a")) == key_code(ord("A")) == KEY_A
    assert key_code(ord("z")) == KEY_Z
    assert key_code(0xFF0D) == KEY_ENTER
    assert key_code(0xFFE1) == KEY_LEFTSHIFT
    assert key_code(0xFFBE) == KEY_F1 and key_code(0xFFC9) == KEY_F12
    assert key_code(0xFF52) == KEY_UP and key_code(0xFFFF) == KEY_DELETE
    assert key_code(0xFF8D) == KEY_KPENTER and key_code(0xFE03) == KEY_RIGHTALT
    assert key_code(ord(" ")) == KEY_SPACE
    assert key_code(ord("!")) == key_code(ord("1")) == 2
    assert key_code(0x20AC) is None  # EuroSign: no key on a US keyboard


def test_key_press_repeat_release() -> None:
    kbd = KeyboardState()
    assert events(kbd.key(ord("a"), True)) == [(EV_KEY, KEY_A, 1), (EV_SYN, 0, 0)]
    assert events(kbd.key(ord("a"), True)) == [(EV_KEY, KEY_A, 2), (EV_SYN, 0, 0)]
    assert events(kbd.key(ord("A"), False)) == [(EV_KEY, KEY_A, 0), (EV_SYN, 0, 0)]
    assert kbd.key(ord("a"), False) == []  # not down: nothing to release
    assert kbd.key(0x20AC, True) == []
    kbd.key(0xFFE1, True)
    kbd.key(ord("b"), True)
    assert events(kbd.release_all()) == [(EV_KEY, KEY_LEFTSHIFT, 0), (EV_KEY, 48, 0),
                                         (EV_SYN, 0, 0)]


def test_tablet_positions_buttons_and_wheel() -> None:
    tab = TabletState()
    assert events(tab.pointer(0, 767, 0, (1024, 768))) == [
        (EV_ABS, ABS_X, 0), (EV_ABS, ABS_Y, ABS_MAX), (EV_SYN, 0, 0)]
    assert events(tab.pointer(1023, 0, 1 | 4, (1024, 768))) == [
        (EV_ABS, ABS_X, ABS_MAX), (EV_ABS, ABS_Y, 0), (EV_KEY, BTN_LEFT, 1),
        (EV_KEY, BTN_RIGHT, 1), (EV_SYN, 0, 0)]
    assert events(tab.pointer(0, 0, 4 | 8, (1024, 768)))[2:] == [
        (EV_KEY, BTN_LEFT, 0), (EV_REL, REL_WHEEL, 1), (EV_SYN, 0, 0)]
    # the wheel button held is one detent, released is none
    assert events(tab.pointer(0, 0, 4 | 8, (1024, 768)))[2:] == [(EV_SYN, 0, 0)]
    assert events(tab.pointer(0, 0, 16, (1024, 768)))[2:] == [
        (EV_KEY, BTN_RIGHT, 0), (EV_REL, REL_WHEEL, -1), (EV_SYN, 0, 0)]


@given(st.integers(-10, 9000), st.integers(0, 8192))
def test_scale_stays_in_range(pos: int, extent: int) -> None:
    v = scale(pos, extent)
    assert 0 <= v <= ABS_MAX
    if extent > 1 and pos >= extent - 1:
        assert v == ABS_MAX


def test_config_items_follow_the_spec() -> None:
    kbd, tab = keyboard_spec(), tablet_spec()
    name = kbd.config(CfgSelect.ID_NAME, 0)
    assert len(name) == CONFIG_SIZE == 136
    assert name[0:3] == bytes([CfgSelect.ID_NAME, 0, len(b"dvmm virtio keyboard")])
    assert name[8:8 + name[2]] == b"dvmm virtio keyboard"
    ids = kbd.config(CfgSelect.ID_DEVIDS, 0)
    assert ids[2] == 8 and struct.unpack_from("<HHHH", ids, 8)[0] == BUS_VIRTUAL
    # 5.8.5.1: an item the device does not have reads with size 0
    assert kbd.config(CfgSelect.EV_BITS, EV_ABS)[2] == 0
    assert kbd.config(CfgSelect.UNSET, 0)[2] == 0
    keys = kbd.config(CfgSelect.EV_BITS, EV_KEY)
    bits = keys[8:8 + keys[2]]
    assert all(bits[c // 8] >> (c % 8) & 1 for c in (KEY_ESC, KEY_A, KEY_UP, KEY_F12))
    assert kbd.config(CfgSelect.EV_BITS, EV_REP)[2] == 1  # software autorepeat
    absx = tab.config(CfgSelect.ABS_INFO, ABS_X)
    assert absx[2] == 20 and struct.unpack_from("<iiiii", absx, 8) == (0, ABS_MAX, 0, 0, 0)
    assert tab.config(CfgSelect.ABS_INFO, 5)[2] == 0
    btn = tab.config(CfgSelect.EV_BITS, EV_KEY)
    assert btn[8 + BTN_LEFT // 8] >> (BTN_LEFT % 8) & 1


def test_bitmap_and_event_parsing() -> None:
    assert bitmap([0, 9]) == b"\x01\x02"
    assert bitmap([]) == b""
    assert parse_event(EVENT.pack(0x11, 1, 1) + b"extra") == (0x11, 1, 1)
    try:
        parse_event(b"\0" * 7)
    except ValueError:
        pass
    else:
        raise AssertionError("a 7-byte event was accepted")
