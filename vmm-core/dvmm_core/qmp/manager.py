"""What ``dvmm run`` wires for management: QMP servers, events, the run loop.

:class:`Management` owns, for one machine:

* the :class:`~.vmctl.MachineVm` (also what the console's monitor prompt
  drives) and its command table;
* one :class:`~.server.QmpServer` over every ``--qmp`` socket (none: no
  threads at all);
* the translation of the core's event stream (``CoreControl.listeners``)
  into QMP events: ``guest-reset`` -> RESET, the vhost-user link's
  ``device-lost``/``device-restored``/``device-offline`` ->
  X_DVMM_BACKEND_LOST/RESTORED/OFFLINE, the supervisor's
  ``backend-exited``/``backend-restarted`` -> X_DVMM_BACKEND_EXITED/RESTARTED;
* the main thread's loop (:meth:`Management.run`): ``Machine.run`` until it
  ends, serving posted calls (``stop``, ``cont``, register reads) in
  between, then SHUTDOWN with QEMU's ShutdownCause.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .address import QmpAddress, bind, unlink
from .commands import build_table
from .hmp import Hmp
from .options import NIL_UUID
from .server import QmpServer
from .session import CommandTable, QmpSession
from .vmctl import CALL_EVENT, QMP_QUIT, QMP_RESET, MachineVm

if TYPE_CHECKING:
    from ..machine.pc import Machine

log = logging.getLogger("dvmm.qmp")

#: Core events that become QMP events, with the fields they carry over.
FORWARDED = {
    "device-lost": ("X_DVMM_BACKEND_LOST", ("name", "reason")),
    "device-restored": ("X_DVMM_BACKEND_RESTORED", ("name", "outage_ms", "replayed")),
    "device-offline": ("X_DVMM_BACKEND_OFFLINE", ("name", "reason")),
    "backend-exited": ("X_DVMM_BACKEND_EXITED", ("name", "pid", "status", "how")),
    "backend-restarted": ("X_DVMM_BACKEND_RESTARTED", ("name", "pid", "restarts")),
}


def shutdown_cause(why: str, detail: str) -> tuple[bool, str]:
    """(guest, reason) of SHUTDOWN (qapi/run-state.json ShutdownCause)."""
    if why == "shutdown":
        return True, "guest-shutdown"
    if why == "crash":
        return True, "guest-panic"
    if why != "stop":
        return False, "host-error"
    if detail == QMP_QUIT:
        return False, "host-qmp-quit"
    if detail.startswith("SIG"):
        return False, "host-signal"
    return False, "host-ui"  # the console's Ctrl-A x


class Management:
    """QMP and the run loop of one machine (see the module doc)."""

    def __init__(self, machine: Machine, addresses: Sequence[QmpAddress] = (),
                 name: str | None = None, uuid: str | None = None) -> None:
        self.machine = machine
        self.addresses = list(addresses)
        self.vm = MachineVm(machine, name, uuid or NIL_UUID, emit=self.emit)
        self.table: CommandTable = build_table(self.vm)
        self.hmp = Hmp(self.vm)  # the console's monitor prompt
        self.server: QmpServer | None = None

    def start(self) -> None:
        """Bind every address (UsageError if one cannot be) and serve."""
        if not self.addresses:
            return
        socks = []
        try:
            for address in self.addresses:
                socks.append(bind(address))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        self.server = QmpServer(socks, lambda: QmpSession(self.table))
        self.server.start()
        self.machine.control.listeners.append(self._core_event)
        for address in self.addresses:
            log.info("QMP on %s", address)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        if self.server is not None:
            self.server.emit(name, data)

    def _core_event(self, event: str, fields: dict[str, Any]) -> None:
        if event == "guest-reset":
            qmp = fields.get("reason") == QMP_RESET
            self.emit("RESET", {"guest": not qmp,
                                "reason": "host-qmp-system-reset" if qmp else "guest-reset"})
            return
        forwarded = FORWARDED.get(event)
        if forwarded is not None:
            name, keys = forwarded
            self.emit(name, {k.replace("_", "-"): fields[k] for k in keys if k in fields})

    def run(self) -> str:
        """(main thread) The machine's event loop with posted calls served;
        why it ended, after SHUTDOWN was sent."""
        try:
            while True:
                why = self.machine.run(until=lambda kind, detail: kind == CALL_EVENT)
                if why != CALL_EVENT:
                    break
                self.vm.calls.serve()
        finally:
            self.vm.calls.close()
        guest, reason = shutdown_cause(why, self.machine.failure)
        self.emit("SHUTDOWN", {"guest": guest, "reason": reason})
        return why

    def close(self) -> None:
        """After the machine shut down: deliver what waits, close the sockets."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for address in self.addresses:
            unlink(address)
