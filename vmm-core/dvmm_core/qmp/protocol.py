"""QMP messages: requests checked, responses and events encoded (pure).

Owns the wire format of QEMU's ``docs/interop/qmp-spec.rst`` above the JSON
layer (:mod:`.stream`):

* a request is ``{"execute": NAME, "arguments": {...}, "id": ANY}``; anything
  else -- not an object, a missing or non-string ``execute``, arguments that
  are not an object, an unknown member -- is a ``GenericError`` with QEMU's
  wording, and ``id`` is echoed whenever the input was an object that had
  one ("Commands Responses");
* argument checking against a command's declared parameters, before the
  command runs ("Compatibility Considerations": wrong types and unknown
  keys are errors reported before any side effect);
* ``{"return": ..., "id": ...}``, ``{"error": {"class", "desc"}, "id": ...}``
  and events with ``timestamp`` ``{"seconds", "microseconds"}``, each one
  line of ASCII JSON ended by CRLF ("General Definitions");
* the greeting.

It does not know what any command does (:mod:`.commands`) nor sockets
(:mod:`.server`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from enum import StrEnum
from typing import Any, NamedTuple

#: The ``id`` of a request that had none (an id may be any value, even null).
NO_ID: Any = object()


class ErrorClass(StrEnum):
    """QEMU's error classes (qapi/error.json ``QapiErrorClass``)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(Exception):
    """A command failed: sent as ``{"error": {"class", "desc"}}``."""

    def __init__(self, desc: str, cls: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class Request(NamedTuple):
    name: str
    arguments: dict[str, Any]
    id: Any  # NO_ID when the client sent none


class ArgType(StrEnum):
    """The parameter types dvmm's commands use (QAPI's names for them)."""

    STR = "string"
    BOOL = "boolean"
    INT = "int"
    STR_LIST = "array of strings"

    def accepts(self, value: Any) -> bool:
        if self is ArgType.STR:
            return isinstance(value, str)
        if self is ArgType.BOOL:
            return isinstance(value, bool)
        if self is ArgType.INT:
            return isinstance(value, int) and not isinstance(value, bool) \
                and -(1 << 63) <= value < 1 << 64
        return isinstance(value, list) and all(isinstance(v, str) for v in value)


class Param(NamedTuple):
    name: str
    type: ArgType
    required: bool = True


_REQUEST_KEYS = ("execute", "exec-oob", "arguments", "id")


def parse_request(obj: Any) -> Request:
    """A decoded JSON value -> Request, or QmpError (whose ``id`` the caller
    takes from :func:`request_id`)."""
    if not isinstance(obj, dict):
        raise QmpError("QMP input must be a JSON object")
    for key in obj:
        if key not in _REQUEST_KEYS:
            raise QmpError(f"QMP input member '{_printable(key)}' is unexpected")
    if "exec-oob" in obj:
        # The greeting offers no 'oob' capability, so it cannot be enabled.
        raise QmpError("QMP input member 'exec-oob' is unexpected: out-of-band execution "
                       "needs the 'oob' capability, which dvmm does not offer")
    if "execute" not in obj:
        raise QmpError("QMP input lacks member 'execute'")
    name = obj["execute"]
    if not isinstance(name, str):
        raise QmpError("QMP input member 'execute' must be a string")
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    return Request(name, args, obj.get("id", NO_ID))


def request_id(obj: Any) -> Any:
    """The id of a request that may be malformed (NO_ID when there is none)."""
    return obj.get("id", NO_ID) if isinstance(obj, dict) else NO_ID


def check_arguments(params: tuple[Param, ...], args: dict[str, Any]) -> None:
    """QEMU's input visitor checks: unknown, missing, wrongly typed parameters."""
    known = {p.name: p for p in params}
    for key in args:
        if key not in known:
            raise QmpError(f"Parameter '{_printable(key)}' is unexpected")
    for p in params:
        if p.name not in args:
            if p.required:
                raise QmpError(f"Parameter '{p.name}' is missing")
        elif not p.type.accepts(args[p.name]):
            raise QmpError(f"Invalid parameter type for '{p.name}', expected: {p.type.value}")


def _printable(text: str) -> str:
    """A client's string quoted back at it: bounded and free of control characters."""
    text = "".join(c if c.isprintable() else "?" for c in text[:64])
    return text + ("..." if len(text) >= 64 else "")


# -- encoding --------------------------------------------------------------------
def encode(message: dict[str, Any]) -> bytes:
    """One server message: ASCII JSON (``ensure_ascii``), CRLF-terminated."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False,
                      default=_jsonable).encode("ascii") + b"\r\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def with_id(message: dict[str, Any], rid: Any) -> dict[str, Any]:
    if rid is not NO_ID:
        message["id"] = rid
    return message


def success(value: Any, rid: Any = NO_ID) -> bytes:
    return encode(with_id({"return": value}, rid))


def failure(error: QmpError, rid: Any = NO_ID) -> bytes:
    return encode(with_id({"error": {"class": error.cls.value, "desc": error.desc}}, rid))


def timestamp(ts: float | None = None) -> dict[str, int]:
    """The event timestamp; -1/-1 when the host time cannot be had (spec)."""
    if ts is None:
        ts = time.time()
    if not math.isfinite(ts) or ts < 0:
        return {"seconds": -1, "microseconds": -1}
    seconds = int(ts)
    return {"seconds": seconds, "microseconds": int((ts - seconds) * 1_000_000)}


def event(name: str, data: dict[str, Any] | None = None, ts: float | None = None) -> bytes:
    message: dict[str, Any] = {"event": name, "timestamp": timestamp(ts)}
    if data is not None:
        message["data"] = data
    return encode(message)


@functools.cache
def dvmm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dvmm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


def version_info() -> dict[str, Any]:
    """``query-version``'s answer (and the greeting's version): dvmm's own
    version in QEMU's shape, the package naming what answers."""
    parts = [int(p) if p.isdigit() else 0 for p in dvmm_version().split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"dvmm {dvmm_version()}"}


def greeting() -> bytes:
    """"Server Greeting": version and capabilities (none beyond the baseline)."""
    return encode({"QMP": {"version": version_info(), "capabilities": []}})
