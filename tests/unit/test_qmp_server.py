"""The QMP server over a real socket: protocol, hostile clients, real QMP clients.

The machine is faked (``qmp_fakes.FakeVm``); the server, sessions, command
table and HMP are the real ones.  Clients: raw sockets, the ``qemu.qmp``
package (PyPI) and its ``qmp-shell``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dvmm_core.qmp.server import MAX_CLIENTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from .qmp_fakes import RawClient, fake_server


def test_greeting_negotiation_and_id_echo(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, vm, _):
        c = RawClient(path)
        qmp = c.greeting["QMP"]
        assert qmp["capabilities"] == [] and qmp["version"]["package"].startswith("dvmm")
        before = c.cmd("query-status", rid="a")
        assert before == {"id": "a", "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
        assert c.cmd("qmp_capabilities", rid=[1, {"x": None}]) == {"return": {},
                                                                   "id": [1, {"x": None}]}
        again = c.cmd("qmp_capabilities")
        assert again["error"]["class"] == "CommandNotFound"
        assert c.cmd("query-status", rid=7) == {"return": {"running": True, "singlestep": False,
                                                           "status": "running"}, "id": 7}
        assert c.cmd("query-name")["return"] == {"name": "fake"}
        assert c.cmd("query-uuid")["return"] == {"UUID": vm.uuid}
        names = {x["name"] for x in c.cmd("query-commands")["return"]}
        assert {"qmp_capabilities", "stop", "cont", "x-dvmm-query-backends"} <= names
        events = {x["name"] for x in c.cmd("query-events")["return"]}
        assert {"STOP", "RESUME", "RESET", "SHUTDOWN", "X_DVMM_BACKEND_LOST"} <= events
        c.close()


def test_negotiation_enables_no_unknown_capability(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, _):
        c = RawClient(path)
        reply = c.cmd("qmp_capabilities", enable=["oob"])
        assert reply["error"] == {"class": "GenericError",
                                  "desc": "Capability 'oob' not available"}
        c.negotiate()


@pytest.mark.parametrize(("message", "desc"), [
    (b'{"execute": }', "JSON parse error, expecting value"),
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'{"execute": "stop", "arguments": 3, "id": 5}',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "x-dvmm-backend-kill", "arguments": {"name": 3}, "id": 5}',
     "Invalid parameter type for 'name', expected: string"),
    (b'{"execute": "stop", "arguments": {"force": true}, "id": 5}',
     "Parameter 'force' is unexpected"),
    (b'{"execute": "x-dvmm-backend-kill", "id": 5}', "Parameter 'name' is missing"),
    (b'{"exec-oob": "stop", "id": 5}', "QMP input member 'exec-oob' is unexpected"),
])
def test_bad_input_is_a_generic_error_and_the_client_goes_on(
        tmp_path: Path, message: bytes, desc: str) -> None:
    with fake_server(tmp_path) as (path, vm, _):
        c = RawClient(path).negotiate()
        c.send(message)
        reply = c.reply()
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith(desc)
        if b'"id": 5' in message:
            assert reply["id"] == 5
        assert vm.calls == []  # refused before any side effect
        assert c.cmd("query-status")["return"]["status"] == "running"


def test_unknown_command_and_failing_command(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, _):
        c = RawClient(path).negotiate()
        assert c.cmd("no-such-command")["error"] == {
            "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}
        assert c.cmd("system_powerdown")["error"]["desc"].startswith("this machine has no ACPI")


def test_hmp_commands(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, vm, _):
        c = RawClient(path).negotiate()

        def hmp(line: str) -> str:
            out: str = c.cmd("human-monitor-command", **{"command-line": line})["return"]
            return out

        assert hmp("info status") == "VM status: running\n"
        assert hmp("stop") == "" and hmp("info status") == "VM status: paused\n"
        assert "Host bridge: PCI device 8086:1237" in hmp("info pci")
        assert "RAX=" in hmp("info registers")
        assert "blk0" in hmp("info backends")
        assert hmp("frobnicate").startswith("unknown command: 'frobnicate'")
        assert hmp("system_powerdown").startswith("Error: ")
        assert vm.calls == ["stop"]


def test_events_only_after_negotiation_and_in_order(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, server):
        waiting, ready = RawClient(path), RawClient(path).negotiate()
        ready.send({"execute": "stop"})
        ev = ready.recv()  # emitted while the command ran: before its reply (as in QEMU)
        assert ev["event"] == "STOP" and set(ev["timestamp"]) == {"seconds", "microseconds"}
        assert ready.recv() == {"return": {}}
        server.emit("X_TEST", {"k": 1})
        assert ready.recv()["data"] == {"k": 1}
        # The client still negotiating received nothing but its greeting.
        waiting.negotiate()
        server.emit("X_TEST", {"k": 2})
        assert waiting.recv()["data"] == {"k": 2}


def test_two_clients_and_one_that_never_negotiates(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, _):
        idle = RawClient(path)          # connects and never says anything
        half = RawClient(path)
        half.send(b'{"execute": "qmp_cap')  # ... or stops half-way
        a, b = RawClient(path).negotiate(), RawClient(path).negotiate()
        for _ in range(5):
            assert a.cmd("query-status")["return"]["running"]
            assert b.cmd("query-version")["return"]["package"].startswith("dvmm")
        idle.close()
        half.close()


def test_ten_mib_message_is_one_error_and_the_other_client_works(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, _):
        big, other = RawClient(path).negotiate(), RawClient(path).negotiate()
        payload = b'{"execute": "stop", "arguments": {"x": "' + b"A" * (10 << 20) + b'"}}'
        big.send(payload)
        reply = big.reply()
        assert reply["error"]["class"] == "GenericError" and "too large" in reply["error"]["desc"]
        assert other.cmd("query-status")["return"]["status"] == "running"
        assert big.cmd("query-status")["return"]["status"] == "running"


def test_a_client_that_floods_without_reading_is_dropped(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, _):
        flood, other = RawClient(path, timeout=30).negotiate(), RawClient(path).negotiate()
        flood.sock.setblocking(False)
        sent = 0
        try:
            while sent < 64 << 20:
                sent += flood.sock.send(b'{"execute": "query-pci"}' * 1000)
        except BlockingIOError:
            pass  # the server stopped reading it: its own fault
        assert other.cmd("query-status")["return"]["running"]
        flood.close()


def test_too_many_clients_are_refused_with_an_error(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (path, _, _):
        clients = [RawClient(path) for _ in range(MAX_CLIENTS)]
        extra = RawClient(path)
        assert extra.greeting["error"]["desc"].startswith("too many QMP clients")
        assert extra.closed()
        assert clients[0].negotiate().cmd("query-status")["return"]["running"]
        for c in clients:
            c.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=200) | st.builds(
    lambda v: json.dumps(v).encode(),
    st.recursive(st.none() | st.integers() | st.text(max_size=8) | st.booleans(),
                 lambda i: st.lists(i, max_size=3) | st.dictionaries(
                     st.sampled_from(["execute", "arguments", "id", "x"]) | st.text(max_size=4),
                     i, max_size=4), max_leaves=8)))
def test_fuzzed_input_never_stops_the_server(tmp_path: Path, junk: bytes) -> None:
    with fake_server(tmp_path) as (path, vm, _):
        c = RawClient(path).negotiate()
        # Junk, then a control character (the spec's resynchronisation), then a command.
        c.send(junk + b"\x01 " + json.dumps({"execute": "query-name", "id": "probe"}).encode())
        while True:
            msg = c.reply()
            assert set(msg) & {"return", "error"}, msg
            if msg.get("id") == "probe":
                assert msg == {"return": {"name": "fake"}, "id": "probe"}
                break
        assert "quit" not in vm.calls or b"quit" in junk


def test_with_the_qemu_qmp_client(tmp_path: Path) -> None:
    async def session(path: str) -> None:
        qmp = QMPClient("dvmm-test")
        await qmp.connect(path)
        try:
            status = await qmp.execute("query-status")
            assert isinstance(status, dict) and status["status"] == "running"
            with qmp.listener() as listener:
                await qmp.execute("stop")
                event = await asyncio.wait_for(listener.get(), 10)
                assert event["event"] == "STOP"
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("nope")
            assert err.value.error_class == "CommandNotFound"
            backends = await qmp.execute("x-dvmm-query-backends")
            assert isinstance(backends, list) and backends[0]["name"] == "blk0"
        finally:
            await qmp.disconnect()

    with fake_server(tmp_path) as (path, vm, _):
        asyncio.run(session(path))
        assert vm.state == "paused"


def test_qmp_shell_runs_query_status(tmp_path: Path) -> None:
    shell = Path(sys.executable).with_name("qmp-shell")
    assert shell.exists(), "qemu.qmp's qmp-shell (pip install qemu.qmp)"
    with fake_server(tmp_path) as (path, _, _):
        out = subprocess.run([str(shell), path], input="query-status\nquery-name\n",
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "HOME": str(tmp_path)})
        assert out.returncode == 0, out.stderr
        assert '"status": "running"' in out.stdout, out.stdout
        assert '"name": "fake"' in out.stdout
