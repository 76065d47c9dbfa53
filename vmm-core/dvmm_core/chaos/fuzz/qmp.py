"""Fuzz target ``qmp``: a hostile QMP client's byte stream.

Each input is one client connection's bytes, cut into reads anywhere, fed
to the real :class:`~dvmm_core.qmp.session.QmpSession` with the real
command table and HMP (:func:`~dvmm_core.qmp.commands.build_table`); each
value the stream yields is processed into its reply, as the server's
executor does.  The bytes are raw, or JSON commands built from the table's
names with arguments of every JSON type (wrong types, missing and extra
keys, deep nesting, huge numbers, control characters, single quotes),
before and after negotiation, and HMP command lines.  Only the machine is
a fake (:class:`FakeVm`, at the commands' edge: the :class:`VmApi`).

A crash: an exception out of ``feed`` or ``process``, a reply that is not
one JSON object on one line, or an ``internal error`` reply -- the session
turns a command's exception into one so the core survives, but it is still
a bug the fuzzer must report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._atheris import Provider, provider
from .hostile import FuzzFinding, choose, pick

MAX_VALUES = 32
_WORDS = ["info", "status", "registers", "pci", "backends", "cpus", "block", "stop", "cont",
          "c", "q", "quit", "help", "?", "system_reset", "system_powerdown", "x", "\x00", ""]
_KEYS = ["execute", "exec-oob", "arguments", "id", "command-line", "cpu-index", "name",
         "enable", "control"]


class FakeVm:
    """A VM that runs nothing, refusing as the real one does at its edge."""

    name: str | None = "fuzz"
    uuid = "12345678-1234-1234-1234-123456789abc"

    def __init__(self) -> None:
        self.state = "running"

    def status(self) -> str:
        return self.state

    def stop(self) -> None:
        self.state = "paused"

    def cont(self) -> None:
        self.state = "running"

    def system_reset(self) -> None:
        pass

    def system_powerdown(self) -> None:
        from dvmm_core.qmp.protocol import QmpError

        raise QmpError("this machine has no ACPI power button")

    def quit(self) -> None:
        pass

    def cpus(self) -> list[dict[str, Any]]:
        return [{"cpu-index": 0, "thread-id": 1, "target": "x86_64"}]

    def block(self) -> list[dict[str, Any]]:
        return [{"device": "blk0", "inserted": {"file": "/x.img", "ro": False}}]

    def pci(self) -> list[dict[str, Any]]:
        return [{"bus": 0, "slot": 0, "function": 0, "class_info": {"class": 0x600},
                 "id": {"vendor": 0x8086, "device": 0x1237}, "regions": [], "qdev_id": ""}]

    def registers(self, cpu: int | None) -> str:
        from dvmm_core.qmp.protocol import QmpError

        if cpu is not None and cpu != 0:
            raise QmpError(f"no vCPU {cpu} (the VM has 1)")
        return "RAX=0000000000000000\n"

    def backends(self) -> list[dict[str, Any]]:
        return [{"name": "blk0", "pid": 42, "state": "running", "restarts": 0,
                 "rss": 1 << 20, "cpu-seconds": 0.5}]

    def backend_fault(self, name: str, action: str) -> dict[str, Any]:
        from dvmm_core.qmp.protocol import ErrorClass, QmpError

        if name != "blk0":
            raise QmpError(f"no backend named '{name[:64]}'", ErrorClass.DEVICE_NOT_FOUND)
        return {"name": name, "action": action, "pid": 42}


def _value(p: Provider, depth: int = 0) -> Any:
    """Any JSON value, small."""
    kind = choose(p, 8 if depth < 4 else 5)
    if kind == 0:
        return pick(p, [0, 1, -1, 1 << 63, 1 << 64], 64) - (1 << 63) * p.ConsumeBool()
    if kind == 1:
        return _text(p)
    if kind == 2:
        return p.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return pick(p, [0, 1], 16) / 3
    if kind == 5:
        return [_value(p, depth + 1) for _ in range(choose(p, 4))]
    return {_key(p): _value(p, depth + 1) for _ in range(choose(p, 4))}


def _text(p: Provider) -> str:
    if p.ConsumeBool():
        return " ".join(_WORDS[choose(p, len(_WORDS))] for _ in range(choose(p, 4)))
    return p.ConsumeBytes(choose(p, 24)).decode("utf-8", "replace")


def _key(p: Provider) -> str:
    return _KEYS[choose(p, len(_KEYS))] if p.ConsumeIntInRange(0, 3) else _text(p)


def _command(p: Provider, names: list[str]) -> bytes:
    """A command object: a real name (mostly), arguments of any shape, an id."""
    msg: dict[str, Any] = {"execute" if p.ConsumeIntInRange(0, 7) else "exec-oob":
                           names[choose(p, len(names))] if p.ConsumeIntInRange(0, 7)
                           else _value(p)}
    if p.ConsumeBool():
        args = {_key(p): _value(p) for _ in range(choose(p, 3))}
        if p.ConsumeBool():
            args["command-line"] = _text(p)
        msg["arguments"] = args if p.ConsumeIntInRange(0, 7) else _value(p)
    if p.ConsumeBool():
        msg["id"] = _value(p)
    for _ in range(choose(p, 2)):
        msg[_key(p)] = _value(p)
    text = json.dumps(msg)
    if not p.ConsumeIntInRange(0, 7):  # QMP's single quotes
        text = text.replace('"', "'")
    return text.encode()


def _stream(p: Provider, names: list[str]) -> bytes:
    parts = []
    if p.ConsumeIntInRange(0, 3):
        parts.append(b'{"execute": "qmp_capabilities"}')
    while p.remaining_bytes() and len(parts) < MAX_VALUES:
        kind = choose(p, 6)
        parts.append(p.ConsumeBytes(choose(p, 64)) if kind == 0 else _command(p, names))
    return b"\r\n".join(parts)


def _check(reply: bytes) -> None:
    if not reply.endswith(b"\r\n") or reply.count(b"\n") != 1:
        raise FuzzFinding(f"reply is not one line: {reply[:200]!r}")
    msg = json.loads(reply)
    if not isinstance(msg, dict) or not ("return" in msg or "error" in msg):
        raise FuzzFinding(f"reply is neither a return nor an error: {reply[:200]!r}")
    if "error" in msg and "internal error" in str(msg["error"].get("desc", "")):
        raise FuzzFinding(f"a command raised: {msg['error']['desc'][:300]}")


def target(arg: str, work: str) -> Callable[[bytes], None]:
    from dvmm_core.qmp.commands import build_table
    from dvmm_core.qmp.session import QmpSession

    def one(data: bytes) -> None:
        p = provider(data)
        table = build_table(FakeVm())
        session = QmpSession(table, max_size=pick(p, [1 << 20, 64, 4096], 20) or None)
        reads = [1 + pick(p, [4096, 1, 7], 12) for _ in range(1 + choose(p, 4))]
        stream = _stream(p, table.names())
        at = i = 0
        while at < len(stream):  # reads of any size, as the socket splits them
            step = reads[i % len(reads)]
            for item in session.feed(stream[at:at + step]):
                _check(session.process(item))
            at, i = at + step, i + 1

    return one
