"""Control virtqueue commands (5.1.6.5): parsing and the ack byte."""

from __future__ import annotations

import struct

import pytest
from dvmm_net.request import (
    MAX_CTRL_BYTES,
    AnnounceAck,
    CtrlDataError,
    CtrlError,
    CtrlShortError,
    CtrlUnknownError,
    GuestOffloadsSet,
    MacAddrSet,
    MacTableSet,
    MqPairsSet,
    NoAckByteError,
    RxMode,
    parse_command,
    read_command,
    take_ack,
)
from dvmm_shared.chain import ChainReader, ChainWriter
from hypothesis import given
from hypothesis import strategies as st

MAC_A = bytes.fromhex("525400123456")
MAC_B = bytes.fromhex("01005e000001")


def mac_table(*tables: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + b"".join(t) for t in tables)


@pytest.mark.parametrize("data, command", [
    (b"\x00\x00\x01", RxMode(0, True)),
    (b"\x00\x05\x00", RxMode(5, False)),
    (b"\x01\x00" + mac_table([MAC_A], [MAC_B, MAC_B]), MacTableSet((MAC_A,), (MAC_B, MAC_B))),
    (b"\x01\x00" + mac_table([], []), MacTableSet((), ())),
    (b"\x01\x01" + MAC_A, MacAddrSet(MAC_A)),
    (b"\x03\x00", AnnounceAck()),
    (b"\x04\x00" + struct.pack("<H", 2), MqPairsSet(2)),
    (b"\x05\x00" + struct.pack("<Q", 0x183), GuestOffloadsSet(0x183)),
])
def test_commands(data: bytes, command: object) -> None:
    assert parse_command(data) == command


@pytest.mark.parametrize("data, error", [
    (b"", CtrlShortError),
    (b"\x04", CtrlShortError),
    (b"\x00\x06\x01", CtrlUnknownError),  # RX command 6 does not exist
    (b"\x00\x00", CtrlDataError),  # no on/off byte
    (b"\x00\x00\x02", CtrlDataError),
    (b"\x00\x00\x01\x00", CtrlDataError),  # an extra byte
    (b"\x01\x00" + mac_table([MAC_A]), CtrlDataError),  # no multicast table
    (b"\x01\x00" + struct.pack("<I", 3) + MAC_A, CtrlDataError),  # 3 entries promised
    (b"\x01\x00" + mac_table([], []) + b"x", CtrlDataError),
    (b"\x01\x01" + MAC_A[:5], CtrlDataError),
    (b"\x01\x07", CtrlUnknownError),
    (b"\x02\x00\x01\x00", CtrlUnknownError),  # VLAN: not implemented
    (b"\x04\x00\x01", CtrlDataError),
    (b"\x04\x01" + bytes(8), CtrlUnknownError),  # RSS_CONFIG
    (b"\x09\x00", CtrlUnknownError),
])
def test_refused_commands(data: bytes, error: type[CtrlError]) -> None:
    with pytest.raises(error):
        parse_command(data)


def test_ack_byte_is_the_last_writable_byte() -> None:
    buf = bytearray(4)
    ack = take_ack(ChainWriter([memoryview(buf)[:3], memoryview(buf)[3:]]))
    ack[0] = 7
    assert buf == b"\0\0\0\x07"
    with pytest.raises(NoAckByteError):
        take_ack(ChainWriter([]))


def test_huge_command_is_refused_without_reading_it() -> None:
    big = memoryview(bytearray(MAX_CTRL_BYTES + 1))
    with pytest.raises(CtrlDataError):
        read_command(ChainReader([big]))


def test_command_split_across_buffers() -> None:
    data = b"\x04\x00" + struct.pack("<H", 3)
    views = [memoryview(bytearray(data[i:i + 1])) for i in range(len(data))]
    assert read_command(ChainReader(views)) == MqPairsSet(3)


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_typed(data: bytes) -> None:
    try:
        parse_command(data)
    except CtrlError:
        pass


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40))
def test_any_class_and_command(cls: int, cmd: int, body: bytes) -> None:
    try:
        parse_command(bytes([cls, cmd]) + body)
    except CtrlError:
        pass
