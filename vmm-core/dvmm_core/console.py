"""The serial console on a terminal: escape keys, a monitor prompt, the tty mode.

Owns what ``dvmm run`` does with its terminal when COM1 is ``stdio``:

* :class:`EscapeKeys`, a state machine over input *bytes* (never over
  reads: a paste, ssh or ``tmux send-keys C-a x`` deliver the two keys in
  one read, fast typing in two) with QEMU's character-multiplexer keys
  (``chardev/char-mux.c``): ``C-a x`` quits, ``C-a h`` (or ``?``) lists the
  keys, ``C-a C-a`` sends one C-a, ``C-a c`` switches between the guest and
  the monitor; any other key after ``C-a`` is dropped.  No byte of an escape
  sequence reaches the guest.  ``--escape-char`` picks another key (QEMU's
  ``-echr``);
* :class:`MonitorLine`, the monitor prompt's line editor; each line runs as
  an HMP command (:mod:`.qmp.hmp`: ``info status``, ``stop``, ``cont``,
  ``system_reset``, ``quit``, ``info backends``...).  While the monitor has
  the terminal, guest output is held (up to :data:`HELD_MAX` bytes) and
  shown when the guest console comes back, as QEMU's mux does;
* the terminal mode: raw while dvmm runs, and restored whatever ends it --
  quit, SIGTERM, an exception in the core (``close`` on the way out, and
  ``atexit`` behind it), or stdout going away (the terminal is handed back
  at the first failed write, so Ctrl-C works again).

Without a terminal on stdin, input goes to the guest byte for byte, as a
pipe carries it (no escape keys).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .machine.pc import Machine
    from .qmp.hmp import Hmp

log = logging.getLogger("dvmm.console")

CTRL_A = 0x01
HELD_MAX = 64 << 10
PROMPT = b"(dvmm) "


def parse_escape_char(text: str) -> int:
    """``ctrl-a``, ``C-a``, ``^A``, or a code (``0x14``, ``20``) -> the byte.
    ValueError names what is accepted."""
    t = text.strip().lower()
    for prefix in ("ctrl-", "ctrl+", "c-", "^"):
        if t.startswith(prefix) and len(t) == len(prefix) + 1 and "a" <= t[-1] <= "z":
            return ord(t[-1]) - ord("a") + 1
    try:
        code = int(t, 0)
    except ValueError:
        code = -1
    if 1 <= code <= 0x1F:
        return code
    raise ValueError(f"escape character {text!r}: use ctrl-a .. ctrl-z, ^X, or a control "
                     "code 1..31 (0x14 is Ctrl-T)")


def key_name(code: int) -> str:
    return f"Ctrl-{chr(code + ord('a') - 1)}" if 1 <= code <= 26 else f"{code:#04x}"


class Key(Enum):
    """What an escape sequence asks for."""

    QUIT = "x"
    HELP = "h"
    SWITCH = "c"


class EscapeState(Enum):
    NORMAL = "normal"
    ESCAPE = "escape"  # the escape character came; the next byte says what to do


class EscapeKeys:
    """Bytes in, in order: ``bytes`` for the focused side, or a :class:`Key`."""

    _KEYS: ClassVar[dict[int, Key]] = {ord("x"): Key.QUIT, ord("h"): Key.HELP,
                                       ord("?"): Key.HELP, ord("c"): Key.SWITCH}

    def __init__(self, escape: int = CTRL_A) -> None:
        self.escape = escape
        self.state = EscapeState.NORMAL

    def feed(self, data: bytes) -> list[bytes | Key]:
        out: list[bytes | Key] = []
        plain = bytearray()
        for byte in data:
            if self.state is EscapeState.ESCAPE:
                self.state = EscapeState.NORMAL
                if byte == self.escape:
                    plain.append(byte)          # C-a C-a: one C-a goes through
                    continue
                key = self._KEYS.get(byte)
                if key is not None:
                    if plain:
                        out.append(bytes(plain))
                        plain.clear()
                    out.append(key)
                # any other key after the escape is dropped (as QEMU's mux does)
            elif byte == self.escape:
                self.state = EscapeState.ESCAPE
            else:
                plain.append(byte)
        if plain:
            out.append(bytes(plain))
        return out


class MonitorLine:
    """The monitor prompt's line editor: echo, backspace, Ctrl-U, Enter."""

    def __init__(self) -> None:
        self.line = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """(what to echo, the lines completed)."""
        echo, lines = bytearray(), []
        for byte in data:
            if byte in (0x0D, 0x0A):
                lines.append(self.line.decode("utf-8", "replace"))
                self.line.clear()
                echo += b"\r\n"
            elif byte in (0x7F, 0x08):
                if self.line:
                    self.line.pop()
                    echo += b"\b \b"
            elif byte == 0x15:  # Ctrl-U: the whole line
                echo += b"\b \b" * len(self.line)
                self.line.clear()
            elif byte >= 0x20 and len(self.line) < 1024:
                self.line.append(byte)
                echo.append(byte)
        return bytes(echo), lines


class Focus(Enum):
    GUEST = "guest"
    MONITOR = "monitor"


def _help(escape: int) -> bytes:
    name = key_name(escape)
    lines = [f"{name} h    print this help", f"{name} x    exit dvmm (stops the VM and its "
             "backends)", f"{name} c    switch between the guest console and the monitor",
             f"{name} {name}  send {name} to the guest"]
    return ("\r\n" + "\r\n".join(lines) + "\r\n").encode()


class Console:
    """The terminal of ``dvmm run --serial stdio`` (see the module doc)."""

    def __init__(self, escape: int = CTRL_A, fd_in: int = 0, fd_out: int = 1) -> None:
        self.fd_in, self.fd_out = fd_in, fd_out
        self.keys = EscapeKeys(escape)
        self.monitor = MonitorLine()
        self.focus = Focus.GUEST
        self._lock = threading.Lock()  # output order: guest bytes, echoes, held output
        self._held = bytearray()
        self._saved: list[Any] | None = None
        self._gone = False  # stdout failed: nothing more is written
        self.machine: Machine | None = None
        self.hmp: Hmp | None = None
        self.on_quit: Callable[[], None] = lambda: None

    @property
    def escapes(self) -> bool:
        """Escape keys work on a terminal only (a pipe carries bytes as they are)."""
        return self._saved is not None

    def attach(self, machine: Machine, hmp: Hmp | None) -> None:
        """Put a terminal in raw mode and start feeding stdin to the guest
        (and the monitor).  Before this, output goes out as it comes."""
        if os.isatty(self.fd_in):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd_in)
            atexit.register(self.restore)
            tty.setraw(self.fd_in)
        self.machine, self.hmp = machine, hmp
        self.on_quit = lambda: machine.request_stop("Ctrl-A x")
        threading.Thread(target=self._loop, name="console", daemon=True).start()

    # -- output ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """The guest's COM1 output (the serial sink)."""
        with self._lock:
            if self.focus is Focus.MONITOR:
                room = HELD_MAX - len(self._held)
                self._held += data[:max(0, room)]
                return
            self._out(data)

    def _out(self, data: bytes) -> None:
        """(lock held) Write to the terminal; the first failure hands it back."""
        view = memoryview(data)
        while view and not self._gone:
            try:
                view = view[os.write(self.fd_out, view):]
            except BlockingIOError:
                continue
            except OSError:
                self._gone = True
                log.info("console output is gone: terminal mode restored")
                self.restore()

    # -- input -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                data = os.read(self.fd_in, 1024)
            except OSError:
                return
            if not data or self._gone:
                return
            if not self.escapes:
                self._to_guest(data)
                continue
            for item in self.keys.feed(data):
                if self._handle(item):
                    return

    def _handle(self, item: bytes | Key) -> bool:
        """One input item; True when the console is done (quit)."""
        if item is Key.QUIT:
            self.on_quit()
            return True
        if item is Key.HELP:
            with self._lock:
                self._out(_help(self.keys.escape))
        elif item is Key.SWITCH:
            self._switch()
        elif isinstance(item, bytes):
            if self.focus is Focus.GUEST:
                self._to_guest(item)
            else:
                self._monitor_input(item)
        return False

    def _to_guest(self, data: bytes) -> None:
        if self.machine is not None:
            self.machine.serial.feed(data)

    def _switch(self) -> None:
        with self._lock:
            if self.focus is Focus.GUEST:
                self.focus = Focus.MONITOR
                self._out(b"\r\nQEMU-style monitor: help lists the commands, "
                          + key_name(self.keys.escape).encode() + b" c returns to the guest"
                          + b"\r\n" + PROMPT + bytes(self.monitor.line))
            else:
                self.focus = Focus.GUEST
                held, self._held = bytes(self._held), bytearray()
                self._out(b"\r\n" + held)

    def _monitor_input(self, data: bytes) -> None:
        echo, lines = self.monitor.feed(data)
        with self._lock:
            self._out(echo)
        for line in lines:
            text = self.hmp.run(line) if self.hmp is not None else "no monitor\n"
            with self._lock:
                self._out(text.replace("\n", "\r\n").encode() + PROMPT)

    # -- the terminal ------------------------------------------------------------
    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; any thread, atexit)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        import termios

        try:
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            pass

    def close(self) -> None:
        self.restore()
