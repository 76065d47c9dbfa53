"""A QMP server over a real Unix socket with a fake VM behind it, and a raw client.

The server, sessions, command table and HMP are the real ones; only the
machine is replaced (:class:`FakeVm` records what was asked of it).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dvmm_core.chaos.fuzz.qmp import FakeVm as FuzzFakeVm
from dvmm_core.qmp.address import QmpAddress, bind
from dvmm_core.qmp.commands import build_table
from dvmm_core.qmp.protocol import QmpError
from dvmm_core.qmp.server import QmpServer
from dvmm_core.qmp.session import QmpSession


class FakeVm(FuzzFakeVm):
    """The VmApi of a VM that runs nothing (the fuzzer's, recording what was
    asked of it and publishing STOP/RESUME)."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = "fake"
        self.uuid = "12345678-1234-1234-1234-123456789abc"
        self.state = "running"
        self.calls: list[str] = []
        self.server: QmpServer | None = None

    def status(self) -> str:
        return self.state

    def stop(self) -> None:
        self.calls.append("stop")
        if self.state == "running":
            self.state = "paused"
            self._emit("STOP")

    def cont(self) -> None:
        self.calls.append("cont")
        if self.state == "paused":
            self.state = "running"
            self._emit("RESUME")

    def _emit(self, name: str) -> None:
        if self.server is not None:
            self.server.emit(name)

    def system_reset(self) -> None:
        self.calls.append("system_reset")

    def quit(self) -> None:
        self.calls.append("quit")

    def registers(self, cpu: int | None) -> str:
        return "RAX=0000000000000000\n"

    def backend_fault(self, name: str, action: str) -> dict[str, Any]:
        if name != "blk0":
            raise QmpError(f"no backend named '{name}'")
        self.calls.append(f"{action} {name}")
        return {"name": name, "action": action, "pid": 42}


@contextmanager
def fake_server(tmp_path: Path, max_size: int | None = None) -> Iterator[tuple[str, FakeVm,
                                                                            QmpServer]]:
    vm = FakeVm()
    table = build_table(vm)
    path = str(tmp_path / "qmp.sock")
    server = QmpServer([bind(QmpAddress("unix", path=path))],
                       lambda: QmpSession(table, max_size))
    vm.server = server
    server.start()
    try:
        yield path, vm, server
    finally:
        server.close(flush=0.5)


class RawClient:
    """A plain socket speaking QMP by hand: one JSON object per line back."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        self.greeting = self.recv()

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def recv(self) -> dict[str, Any]:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        value: dict[str, Any] = json.loads(line)
        return value

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def cmd(self, name: str, rid: Any = None, **args: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        if rid is not None:
            msg["id"] = rid
        self.send(msg)
        return self.reply()

    def negotiate(self) -> RawClient:
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return self

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server hung up (reading and discarding until then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()
