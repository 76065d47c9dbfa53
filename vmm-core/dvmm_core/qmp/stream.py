"""Splitting a QMP byte stream into JSON values (pure: bytes in, values out).

QMP has no framing: the server reads JSON values back to back, as QEMU's
``json-streamer`` does, by counting brackets outside strings (qmp-spec.rst,
"Protocol Specification").  :class:`JsonStreamer` owns that:

* a value ends when its outermost ``{...}`` or ``[...]`` closes; a bare
  scalar at the top level (``42``, ``true``, ``"x"``) is a value too (the
  protocol layer refuses it: input must be an object);
* the spec's extension of ``'single-quoted'`` strings and the ``\\'`` escape
  are rewritten to standard JSON on the way through, so the standard
  library's decoder parses the result;
* a lexical error -- an ASCII control character outside a string other
  than tab, CR and LF, any control character inside a string, or the bytes
  0xFE/0xFF that never occur in UTF-8 -- drops the value being read and
  resets the streamer: the spec's "Forcing the JSON parser into known-good
  state" tells clients to send exactly that to resynchronise;
* hostile sizes: a value longer than ``max_size`` bytes stops being stored
  (the scan goes on, so the stream stays in step) and becomes one error
  when it ends; nesting deeper than ``max_depth`` is an error and a reset.

Every error is a :class:`JsonInputError` in the output, in stream order.
It does not know what a command is (:mod:`.protocol` does).
"""

from __future__ import annotations

import json
import re
from typing import Any

#: QEMU's limits are 64 MiB per token and 1024 levels; a QMP command is a
#: few hundred bytes, so a much smaller cap costs nothing and bounds memory.
MAX_SIZE = 1 << 20
MAX_DEPTH = 1024

_WS = b" \t\r\n"
# What ends a run of ordinary bytes, per state.
_OUTSIDE = re.compile(rb"[\"'{}\[\]\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]")
_IN_DOUBLE = re.compile(rb"[\"\\\x00-\x1f\xfe\xff]")
_IN_SINGLE = re.compile(rb"['\"\\\x00-\x1f\xfe\xff]")
_BARE_END = re.compile(rb"[\s\"'{}\[\]\x00-\x1f\xfe\xff]")


class JsonInputError(Exception):
    """One piece of input that is not a JSON value (a QMP GenericError)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(raw: bytes) -> Any:
    """A complete value's bytes -> Python value, or ``JsonInputError``."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise JsonInputError("JSON parse error, invalid UTF-8 sequence") from None
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"JSON parse error, {exc.msg.lower()}") from None
    except (ValueError, RecursionError) as exc:  # huge integers, NaN, deep nesting
        raise JsonInputError(f"JSON parse error, {exc}") from None


class JsonStreamer:
    """Feed bytes, get the values (and errors) they complete."""

    def __init__(self, max_size: int = MAX_SIZE, max_depth: int = MAX_DEPTH) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._quote: int | None = None  # the open string's quote byte
        self._escape = False            # the previous byte in a string was a backslash
        self._bare = False              # inside a top-level scalar
        self._size = 0                  # bytes of the current value seen (stored or not)

    @property
    def idle(self) -> bool:
        """True between values (nothing half-read)."""
        return self._size == 0

    def feed(self, data: bytes) -> list[Any]:
        """Values completed by ``data``, each a Python value or a JsonInputError."""
        out: list[Any] = []
        pos, end = 0, len(data)
        while pos < end:
            pos = self._step(data, pos, out)
        return out

    # -- one step: a run of plain bytes, then at most one special byte -------
    def _step(self, data: bytes, pos: int, out: list[Any]) -> int:
        if self._quote is not None:
            return self._in_string(data, pos, out)
        if self._bare:
            return self._in_bare(data, pos, out)
        if self._depth == 0:
            while pos < len(data) and data[pos] in _WS:
                pos += 1
            if pos == len(data):
                return pos
            if not _OUTSIDE.match(data, pos):  # a scalar starts here
                self._bare = True
                return pos
        m = _OUTSIDE.search(data, pos)
        stop = len(data) if m is None else m.start()
        self._store(data[pos:stop])
        if m is None:
            return stop
        return self._special_outside(data[stop], stop + 1, out)

    def _special_outside(self, byte: int, pos: int, out: list[Any]) -> int:
        if byte in b"\"'":
            self._quote = byte
            self._store(b'"')
        elif byte in b"{[":
            self._depth += 1
            self._store(bytes((byte,)))
            if self._depth > self.max_depth:
                return self._error(f"JSON nesting deeper than {self.max_depth}", out, pos)
        elif byte in b"}]":
            if self._depth == 0:
                return self._error("JSON parse error, unexpected end of an "
                                   "object or array", out, pos)
            self._depth -= 1
            self._store(bytes((byte,)))
            if self._depth == 0:
                self._finish(out)
        else:
            return self._error(f"JSON parse error, invalid character {byte:#04x}", out, pos)
        return pos

    def _in_string(self, data: bytes, pos: int, out: list[Any]) -> int:
        assert self._quote is not None
        if self._escape:  # the byte after a backslash (possibly in a new chunk)
            self._escape = False
            byte = data[pos]
            if byte < 0x20 or byte >= 0xFE:
                return self._error("JSON parse error, invalid escape", out, pos + 1)
            # \' is QMP's extra escape: plain ' in standard JSON.
            self._store(b"'" if byte == 0x27 else bytes((0x5C, byte)))
            return pos + 1
        pattern = _IN_SINGLE if self._quote == 0x27 else _IN_DOUBLE
        m = pattern.search(data, pos)
        stop = len(data) if m is None else m.start()
        self._store(data[pos:stop])
        if m is None:
            return stop
        byte = data[stop]
        if byte == 0x5C:
            self._escape = True
        elif byte == self._quote:
            self._quote = None
            self._store(b'"')
            if self._depth == 0:
                self._finish(out)
        elif byte == 0x22:  # a double quote inside a single-quoted string
            self._store(b'\\"')
        else:
            return self._error(f"JSON parse error, invalid character {byte:#04x} in a string",
                               out, stop + 1)
        return stop + 1

    def _in_bare(self, data: bytes, pos: int, out: list[Any]) -> int:
        m = _BARE_END.search(data, pos)
        stop = len(data) if m is None else m.start()
        self._store(data[pos:stop])
        if m is not None:
            self._bare = False
            self._finish(out)
        return stop

    # -- bookkeeping ---------------------------------------------------------
    def _store(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.max_size:
            self._buf += chunk
        elif self._buf:
            self._buf = bytearray()  # too big: keep counting, stop storing

    def _finish(self, out: list[Any]) -> None:
        raw, size = bytes(self._buf), self._size
        self._reset()
        if size > self.max_size:
            out.append(JsonInputError(f"JSON message of {size} bytes is too large "
                                      f"(at most {self.max_size})"))
            return
        try:
            out.append(decode(raw))
        except JsonInputError as exc:
            out.append(exc)

    def _error(self, desc: str, out: list[Any], pos: int) -> int:
        self._reset()
        out.append(JsonInputError(desc))
        return pos
