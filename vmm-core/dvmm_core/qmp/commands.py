"""The QMP commands dvmm answers, and the events it may send.

Owns the command table: each command's name, its parameters (checked
before it runs, :mod:`.protocol`) and the shape of its answer, following
QEMU's QAPI schema (``qapi/*.json``) for the standard commands so that
clients written for QEMU read them unchanged.  What a command *does* is
asked of a :class:`VmApi` -- the machine's side (:mod:`.vmctl`), or a fake
in unit tests.  The ``x-`` commands are dvmm's own (qmp-spec.rst: names
beginning with ``x-`` are experimental): its backends over the control
plane.
"""

from __future__ import annotations

from typing import Any, Protocol

from .hmp import Hmp
from .protocol import ArgType, Param, version_info
from .session import Command, CommandTable

#: Events dvmm sends (``query-events``).  POWERDOWN is part of the set for
#: clients that wait for it; this machine has no ACPI power button, so
#: ``system_powerdown`` fails instead and it is never sent.
EVENTS = ("STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN", "X_DVMM_BACKEND_LOST",
          "X_DVMM_BACKEND_RESTORED", "X_DVMM_BACKEND_OFFLINE", "X_DVMM_BACKEND_EXITED",
          "X_DVMM_BACKEND_RESTARTED")


class VmApi(Protocol):
    """What the commands need of the VM (see :mod:`.vmctl`)."""

    name: str | None
    uuid: str

    def status(self) -> str: ...           # QEMU RunState: "running", "paused", ...
    def stop(self) -> None: ...
    def cont(self) -> None: ...
    def system_reset(self) -> None: ...
    def system_powerdown(self) -> None: ...
    def quit(self) -> None: ...
    def cpus(self) -> list[dict[str, Any]]: ...
    def block(self) -> list[dict[str, Any]]: ...
    def pci(self) -> list[dict[str, Any]]: ...
    def registers(self, cpu: int | None) -> str: ...
    def backends(self) -> list[dict[str, Any]]: ...
    def backend_fault(self, name: str, action: str) -> dict[str, Any]: ...


def _empty(action: Any) -> Any:
    def run(args: dict[str, Any]) -> dict[str, Any]:
        action()
        return {}
    return run


def build_table(vm: VmApi) -> CommandTable:
    """Every command, bound to ``vm``."""
    hmp = Hmp(vm)
    name = Param("name", ArgType.STR)
    table = CommandTable()
    commands = [
        Command("query-version", (), lambda a: version_info()),
        Command("query-status", (), lambda a: _status(vm)),
        Command("query-name", (), lambda a: {"name": vm.name} if vm.name else {}),
        Command("query-uuid", (), lambda a: {"UUID": vm.uuid}),
        Command("query-cpus-fast", (), lambda a: vm.cpus()),
        Command("query-block", (), lambda a: vm.block()),
        Command("query-pci", (), lambda a: [{"bus": 0, "devices": vm.pci()}]),
        Command("query-commands", (), lambda a: [{"name": n} for n in table.names()]),
        Command("query-events", (), lambda a: [{"name": e} for e in EVENTS]),
        Command("query-kvm", (), lambda a: {"enabled": True, "present": True}),
        Command("stop", (), _empty(vm.stop)),
        Command("cont", (), _empty(vm.cont)),
        Command("system_reset", (), _empty(vm.system_reset)),
        Command("system_powerdown", (), _empty(vm.system_powerdown)),
        Command("quit", (), _empty(vm.quit)),
        Command("human-monitor-command",
                (Param("command-line", ArgType.STR), Param("cpu-index", ArgType.INT, False)),
                lambda a: hmp.run(a["command-line"], a.get("cpu-index"))),
        Command("x-dvmm-query-backends", (), lambda a: vm.backends()),
        Command("x-dvmm-backend-restart", (name,),
                lambda a: vm.backend_fault(a["name"], "restart")),
        Command("x-dvmm-backend-kill", (name,), lambda a: vm.backend_fault(a["name"], "kill")),
    ]
    for command in commands:
        table.add(command)
    return table


def _status(vm: VmApi) -> dict[str, Any]:
    """``query-status`` (qapi/run-state.json StatusInfo)."""
    status = vm.status()
    return {"running": status == "running", "singlestep": False, "status": status}
