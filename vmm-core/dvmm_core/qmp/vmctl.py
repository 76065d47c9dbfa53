"""The machine's side of QMP: run state, reset, inspection, backends.

:class:`MachineVm` implements :class:`~.commands.VmApi` on a running
:class:`~dvmm_core.machine.pc.Machine`.

Run-state changes happen on the **main thread**, the one that serves the
machine's event queue (``Machine.run``) and already performs guest resets:
a command posts a call (:class:`MainCalls`) and waits for it, so ``stop``,
``cont`` and a reset never interleave.  ``stop`` stops every vCPU runner
(``VcpuRunner.stop``: ``immediate_exit`` plus SIGUSR1 kicks the vCPU out of
``KVM_RUN``, notes §6) and holds the in-kernel timers still
(:mod:`.freeze`); ``Machine.paused`` keeps the vCPUs stopped if the guest
is reset meanwhile.  ``cont`` starts the runners again on the same vCPU
fds: registers, memory and device state are exactly as they were.
Reading registers needs the vCPUs out of ``KVM_RUN`` too (a vCPU ioctl
waits for the vCPU mutex that ``KVM_RUN`` holds): a running VM is held for
the moment it takes, without STOP/RESUME events.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

from .freeze import TimerFreeze
from .inspect import block_info, cpu_info, pci_info, register_dump
from .protocol import ErrorClass, QmpError

if TYPE_CHECKING:
    from ..machine.pc import Machine

log = logging.getLogger("dvmm.qmp")

T = TypeVar("T")

#: The machine event that wakes the main thread for a posted call.
CALL_EVENT = "qmp-call"
#: The reset reason QMP's ``system_reset`` gives (RESET's ``guest: false``).
QMP_RESET = "QMP system_reset"
QMP_QUIT = "QMP quit"
CALL_TIMEOUT = 30.0


class MainCalls:
    """Calls run on the machine's main thread, between its events."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._open = True
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()
        with self._lock:
            if not self._open:
                raise QmpError("the VM is shutting down")
            self._calls.put((fn, future))
        self.machine.events.put((CALL_EVENT, ""))
        try:
            return future.result(CALL_TIMEOUT)
        except FutureTimeout:
            raise QmpError(f"the VM did not act within {CALL_TIMEOUT:.0f} s") from None

    def serve(self) -> None:
        """(main thread) Run every posted call."""
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            self._open = False
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            future.set_exception(QmpError("the VM is shutting down"))


class MachineVm:
    """:class:`~.commands.VmApi` on a Machine (see the module doc)."""

    def __init__(self, machine: Machine, name: str | None = None,
                 uuid: str = "00000000-0000-0000-0000-000000000000",
                 emit: Callable[[str, dict[str, Any] | None], None] | None = None) -> None:
        self.machine = machine
        self.name = name
        self.uuid = uuid
        self.calls = MainCalls(machine)
        self.emit = emit or (lambda name, data: None)
        self.quit_requested = False
        self._timers = TimerFreeze()

    # -- run state --------------------------------------------------------------
    def status(self) -> str:
        """QEMU's RunState names (qapi/run-state.json)."""
        state = self.machine.state
        if self.machine.paused:
            return "paused"
        return {"running": "running", "starting": "prelaunch"}.get(state, "shutdown")

    def stop(self) -> None:
        if self.calls.call(self._pause):
            self.emit("STOP", None)

    def cont(self) -> None:
        if self.calls.call(self._resume):
            self.emit("RESUME", None)

    def _pause(self) -> bool:
        """(main thread) Stop every vCPU; False if they already were."""
        machine = self.machine
        if machine.paused:
            return False
        machine.paused = True
        self._stop_runners()
        if machine.vm is not None:
            self._timers.save(machine.vm.fd)
        machine.state = "paused"
        log.info("VM stopped (QMP)")
        return True

    def _resume(self) -> bool:
        machine = self.machine
        if not machine.paused:
            return False
        if machine.vm is not None:
            self._timers.restore(machine.vm.fd)
        machine.paused = False
        machine.state = "running"
        self._start_runners()
        log.info("VM resumed (QMP)")
        return True

    def _stop_runners(self) -> None:
        for runner in self.machine.runners:
            runner.stop()

    def _start_runners(self) -> None:
        for runner in self.machine.runners:
            if not runner.running:
                runner.start()

    def system_reset(self) -> None:
        self.machine.events.put(("reset", QMP_RESET))

    def system_powerdown(self) -> None:
        raise QmpError("this machine has no ACPI power button (the dvmm PC has no ACPI PM "
                       "device): use system_reset, or quit to stop the VM")

    def quit(self) -> None:
        self.quit_requested = True
        self.machine.request_stop(QMP_QUIT)

    # -- inspection ---------------------------------------------------------------
    def cpus(self) -> list[dict[str, Any]]:
        return cpu_info(self.machine)

    def block(self) -> list[dict[str, Any]]:
        return block_info(self.machine)

    def pci(self) -> list[dict[str, Any]]:
        return pci_info(self.machine)

    def registers(self, cpu: int | None) -> str:
        if cpu is not None and not 0 <= cpu < len(self.machine.vcpus):
            raise QmpError(f"no vCPU {cpu} (the VM has {len(self.machine.vcpus)})")
        return self.calls.call(lambda: self._held(lambda: register_dump(self.machine, cpu)))

    def _held(self, fn: Callable[[], T]) -> T:
        """(main thread) ``fn`` with the vCPUs out of KVM_RUN, as they were after."""
        if self.machine.paused:
            return fn()
        self._stop_runners()
        try:
            return fn()
        finally:
            self._start_runners()

    # -- backends (the control plane) ----------------------------------------------
    def backends(self) -> list[dict[str, Any]]:
        from ..vm_report import ReportError, backend_report

        try:
            return backend_report(self.machine.supervisor.runtime_dir)
        except ReportError as exc:
            raise QmpError(str(exc)) from None

    def backend_fault(self, name: str, action: str) -> dict[str, Any]:
        from ..vm_report import ReportError, backend_fault

        names = [b.name for b in self.machine.supervisor.backends]
        if name not in names:
            known = ", ".join(names) or "none"
            raise QmpError(f"no backend named '{name[:64]}' (backends: {known})",
                           ErrorClass.DEVICE_NOT_FOUND)
        try:
            return backend_fault(self.machine.supervisor.runtime_dir, name, action)
        except ReportError as exc:
            raise QmpError(str(exc)) from None
