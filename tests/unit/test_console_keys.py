"""The serial console's escape keys, monitor line and terminal handling (issue 15).

The key state machine is checked against a reference model for every split
of its input; the Console itself runs on a real pseudo-terminal
(``os.openpty``) with a fake machine (what it feeds the UART is recorded).
"""

from __future__ import annotations

import os
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dvmm_core.console import (
    Console,
    EscapeKeys,
    Focus,
    Key,
    MonitorLine,
    key_name,
    parse_escape_char,
)
from hypothesis import given, settings
from hypothesis import strategies as st

A = 0x01


def reference(data: bytes, esc: int = A) -> list[bytes | Key]:
    """The meaning of a whole input, written the obvious way (one pass, no state kept)."""
    keys = {ord("x"): Key.QUIT, ord("h"): Key.HELP, ord("?"): Key.HELP, ord("c"): Key.SWITCH}
    out: list[bytes | Key] = []
    i = 0
    while i < len(data):
        if data[i] != esc:
            out.append(data[i:i + 1])
        elif i + 1 < len(data):
            nxt = data[i + 1]
            if nxt == esc:
                out.append(bytes([esc]))
            elif nxt in keys:
                out.append(keys[nxt])
            i += 1
        i += 1
    return out


def merged(items: list[bytes | Key]) -> list[bytes | Key]:
    """Adjacent byte runs joined (how input is cut into runs does not matter)."""
    out: list[bytes | Key] = []
    for item in items:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += item
        elif not isinstance(item, bytes) or item:
            out.append(item)
    return out


def fed(chunks: list[bytes], esc: int = A) -> list[bytes | Key]:
    keys = EscapeKeys(esc)
    out: list[bytes | Key] = []
    for chunk in chunks:
        out += keys.feed(chunk)
    return merged(out)


SEQUENCES = [b"\x01x", b"ab\x01\x01cd", b"a\x01zb\x01hc", b"\x01c\x01c", b"\x01\x01\x01x",
             b"q\x01?\x01x"]


@pytest.mark.parametrize("seq", SEQUENCES)
def test_every_split_position_means_the_same(seq: bytes) -> None:
    whole = fed([seq])
    assert whole == merged(reference(seq))
    for cut in range(len(seq) + 1):
        assert fed([seq[:cut], seq[cut:]]) == whole, cut
    assert fed([bytes([b]) for b in seq]) == whole


def test_what_the_guest_gets() -> None:
    assert fed([b"ab\x01\x01cd\x01zef"]) == [b"ab\x01cdef"]
    assert fed([b"a\x01", b"x"]) == [b"a", Key.QUIT]
    assert fed([b"\x14x\x01x"], esc=0x14) == [Key.QUIT, b"\x01x"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\x01", b"x", b"h", b"c", b"?", b"a", b"\x00", b"zz"]),
                max_size=30), st.lists(st.integers(0, 60), max_size=5))
def test_any_input_any_split(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert fed(chunks) == merged(reference(data))


def test_monitor_line_editing() -> None:
    line = MonitorLine()
    echo, lines = line.feed(b"info stx\x7fatus\r")
    assert lines == ["info status"] and echo == b"info stx\b \batus\r\n"
    echo, lines = line.feed(b"junk\x15sys\x1b")  # Ctrl-U clears, control bytes ignored
    assert lines == [] and line.line == b"sys"
    assert line.feed(b"tem_reset\n")[1] == ["system_reset"]


@pytest.mark.parametrize(("text", "code"), [("ctrl-a", 1), ("C-t", 20), ("^B", 2),
                                            ("0x14", 20), ("29", 29)])
def test_escape_char_option(text: str, code: int) -> None:
    assert parse_escape_char(text) == code


@pytest.mark.parametrize("text", ["a", "ctrl-1", "0", "32", "ctrl-ab"])
def test_bad_escape_char(text: str) -> None:
    with pytest.raises(ValueError, match=r"ctrl-a \.\. ctrl-z"):
        parse_escape_char(text)
    assert key_name(1) == "Ctrl-a" and key_name(0x1C) == "0x1c"


# -- the Console on a real pty ------------------------------------------------------
class FakeSerial:
    def __init__(self) -> None:
        self.fed = bytearray()

    def feed(self, data: bytes) -> int:
        self.fed += data
        return len(data)


class FakeMachine:
    def __init__(self) -> None:
        self.serial = FakeSerial()
        self.stops: list[str] = []

    def request_stop(self, why: str) -> None:
        self.stops.append(why)


class FakeHmp:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def run(self, line: str, cpu: int | None = None) -> str:
        self.lines.append(line)
        return "VM status: running\n"


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def read_until(master: int, text: bytes) -> bytes:
    got = b""
    deadline = time.monotonic() + 10
    while text not in got:
        assert time.monotonic() < deadline, got
        got += os.read(master, 4096)
    return got


def test_console_on_a_pty(pty: tuple[int, int]) -> None:
    master, slave = pty
    before = termios.tcgetattr(slave)
    machine, hmp = FakeMachine(), FakeHmp()
    console = Console(fd_in=slave, fd_out=slave)
    console.attach(machine, hmp)  # type: ignore[arg-type]
    try:
        assert termios.tcgetattr(slave) != before
        os.write(master, b"ab\x01\x01c")
        until(lambda: machine.serial.fed == b"ab\x01c", "guest bytes")
        os.write(master, b"\x01c")                   # to the monitor
        read_until(master, b"(dvmm) ")
        console.write(b"held while the monitor has the terminal")
        os.write(master, b"info status\r")
        read_until(master, b"VM status: running\r\n(dvmm) ")
        assert hmp.lines == ["info status"] and console.focus is Focus.MONITOR
        os.write(master, b"\x01c")                   # back: the held output comes out
        read_until(master, b"held while the monitor")
        os.write(master, b"\x01")
        os.write(master, b"x")
        until(lambda: machine.stops == ["Ctrl-A x"], "the quit request")
        assert machine.serial.fed == b"ab\x01c"
    finally:
        console.close()
    assert termios.tcgetattr(slave) == before


CRASH = """
import os, sys, termios
from dvmm_core.console import Console

class Machine:
    class serial:
        feed = staticmethod(lambda data: len(data))
    request_stop = staticmethod(lambda why: None)

fd = int(sys.argv[1])
before = termios.tcgetattr(fd)
Console(fd_in=fd, fd_out=fd).attach(Machine(), None)
assert termios.tcgetattr(fd) != before
print("raw", flush=True)
raise RuntimeError("the core crashed")
"""


def test_the_terminal_comes_back_when_the_process_dies_of_an_exception(
        pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    out = subprocess.run([sys.executable, "-c", CRASH, str(slave)], pass_fds=(slave,),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "raw\n" and "the core crashed" in out.stderr, out.stderr
    assert termios.tcgetattr(slave) == before


def test_failed_output_hands_the_terminal_back(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    read_end, write_end = os.pipe()
    console = Console(fd_in=slave, fd_out=write_end)
    console.attach(FakeMachine(), None)  # type: ignore[arg-type]
    try:
        console.write(b"seen")
        assert os.read(read_end, 10) == b"seen"
        os.close(read_end)
        console.write(b"nobody reads this")          # EPIPE
        assert termios.tcgetattr(slave) == before
        console.write(b"and nothing more is tried")
    finally:
        os.close(write_end)
        console.close()
