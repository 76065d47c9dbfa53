"""vhost-user devices brought up beside the guest, not before it.

Owns the start-up of each vhost-user device of the machine, from its
backend process to the virtio-pci function the guest sees, and the choice
it makes about when the guest may see it (issue 9, "Start-up"):

1. ``Machine.start`` spawns every dvmm backend (a fork and an exec, about
   a millisecond each) *before* it creates the VM, so the backends'
   interpreters load while KVM is set up;
2. each device's PCI slot holds a :class:`PendingFunction` from the start;
3. the vCPUs start: the firmware runs while the backends are still starting;
4. then one connector thread per device (:meth:`VhostDevice.begin`) imports
   the vhost-user stack, waits for the backend's socket, negotiates
   (``VhostUserLink.connect``) and builds the transport and the function;
5. **the device's first access waits for its backend**: the guest's first
   config-space access to the slot blocks, on that vCPU, until the connector
   has finished, and then the real function takes the slot and answers.
   Every guest finds PCI devices by reading config space (SeaBIOS's
   ``pci_probe_devices``, Linux's bus scan), so no guest can see or touch a
   device whose backend is not up.

The other option -- the device appears only once its backend is up -- was
not taken: this machine has no PCI hot-plug, so a firmware that scanned the
bus before the backend listened would never see the disk.

A backend that never comes up (it exits before listening, nobody listens on
an external socket, negotiation fails) ends the start as before, only later:
the machine gets a ``start-failed`` event with the one-line reason (``dvmm
run`` prints it as its error), and an access waiting for that device reads
all ones (no device).  Stopping the machine cancels every connector, which
also releases a vCPU waiting for one.
"""

from __future__ import annotations

import logging
import threading
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from .pci import PciBus, PciDevice

if TYPE_CHECKING:
    from dvmm_shared.memory import GuestMemory

    from ..supervisor import Backend, Supervisor
    from ..vhost_user_frontend import RamRegion, VhostUserLink
    from ..virtio_pci.device import VirtioPciDevice
    from .bus import Bus
    from .intx import IntxPump
    from .irq import IrqRouter

log = logging.getLogger("dvmm.machine")

#: How long a guest access waits for a backend before the device reads as
#: absent.  The connector's own deadlines (socket 15 s, replies 10 s) end first.
FIRST_ACCESS_WAIT = 60.0
#: How long waiting for a socket that a backend we started will create may take.
SOCKET_WAIT = 15.0


class DeviceStart(Enum):
    CONNECTING = "connecting"  # backend starting, or negotiating
    READY = "ready"            # the real function is built (it takes the slot on access)
    FAILED = "failed"          # the backend never came up: the machine stops
    CANCELLED = "cancelled"    # the machine stopped first


class DeviceHost(Protocol):
    """What a device needs from the machine (``Machine`` fits)."""

    supervisor: Supervisor
    router: IrqRouter
    pump: IntxPump
    mmio: Bus
    links: dict[str, VhostUserLink]

    def ram_regions(self) -> list[RamRegion]: ...
    def guest_memory(self) -> GuestMemory: ...
    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None: ...
    def publish(self, event: str, fields: dict[str, Any]) -> None: ...
    def start_failed(self, reason: str) -> None: ...


class VhostDevice:
    """One vhost-user device: its backend (spawned or external), its link,
    and the PCI function, built on a connector thread (see the module doc)."""

    def __init__(self, host: DeviceHost, name: str, device_type: int, config_size: int,
                 *, socket: str | None = None, backend: Backend | None = None,
                 backend_socket: str | None = None) -> None:
        if (socket is None) == (backend is None):
            raise ValueError("a device has either an external socket or a backend")
        #: One of the backend's other sockets (a process serving several
        #: devices: the display's virtio-input), bound before its main one.
        self.backend_socket = backend_socket
        self.host = host
        self.name = name
        self.device_type = device_type
        self.config_size = config_size
        self.socket = socket
        self.backend = backend
        self.state = DeviceStart.CONNECTING
        self.failure = ""
        self.link: VhostUserLink | None = None
        self.function: VirtioPciDevice | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        self._thread = threading.Thread(target=self._connect, name=f"start-{self.name}",
                                        daemon=True)
        self._thread.start()

    def wait(self, timeout: float = FIRST_ACCESS_WAIT) -> VirtioPciDevice | None:
        """The function once the backend is up; None if it failed, was
        cancelled or took longer than ``timeout``."""
        self._done.wait(timeout)
        return self.function if self.state is DeviceStart.READY else None

    @property
    def settled(self) -> bool:
        return self._done.is_set()

    # -- the connector thread ---------------------------------------------------
    def _connect(self) -> None:
        from ..supervisor import SupervisorError
        from ..vhost_user_frontend import LinkDown

        try:
            function = self._bring_up()
        except (LinkDown, SupervisorError, OSError) as exc:
            self._finish(DeviceStart.FAILED, str(exc))
        except _Cancelled:
            self._finish(DeviceStart.CANCELLED, "the machine stopped")
        else:
            with self._lock:
                if self.state is DeviceStart.CONNECTING:
                    self.function, self.state = function, DeviceStart.READY
            self._done.set()

    def _bring_up(self) -> VirtioPciDevice:
        from ..vhost_user_frontend import VhostUserLink
        from ..virtio_pci.device import VirtioPciDevice
        from ..virtio_pci.transport import VirtioTransport

        host = self.host
        path, wait = self.socket, 0.0  # an external backend listens already, or it is an error
        if self.backend is not None:
            host.supervisor.wait_for_socket(self.backend, SOCKET_WAIT,
                                            cancelled=lambda: self._done.is_set())
            path, wait = self.backend_socket or self.backend.socket, 10.0
        assert path is not None
        link = VhostUserLink(self.name, path, host.ram_regions(),
                             config_size=self.config_size, mem=host.guest_memory(),
                             on_event=host.publish)
        with self._lock:
            if self.state is not DeviceStart.CONNECTING:
                raise _Cancelled
            self.link = link
            host.links[self.name] = link
        link.connect(timeout=wait)
        transport = VirtioTransport(self.name, link, host.router, host, host.pump)
        return VirtioPciDevice(self.device_type, transport, host.mmio)

    def _finish(self, state: DeviceStart, reason: str) -> None:
        with self._lock:
            if self.state is not DeviceStart.CONNECTING:
                return
            self.state, self.failure = state, reason
        self._done.set()
        if state is DeviceStart.FAILED:
            self.host.start_failed(reason)

    # -- stopping -----------------------------------------------------------------
    def cancel(self) -> None:
        """The machine stops: no connector result is used any more, and a vCPU
        waiting for this device goes on (reading no device)."""
        self._finish(DeviceStart.CANCELLED, "the machine stopped")

    def close(self) -> None:
        """After :meth:`cancel`: wait for the connector, close the link and transport."""
        self.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        link, function = self.link, self.function
        if link is not None:
            link.close()
        if function is not None:
            function.transport.close()


class _Cancelled(Exception):
    pass


class PendingFunction(PciDevice):
    """Holds a PCI slot for a device whose backend may still be starting.

    Its first config access waits for the device (see the module doc), puts
    the real function in the slot and forwards the access; it never answers
    with config space of its own.  Accesses arrive with the port bus lock
    held, so no other vCPU sees the slot change half-way."""

    def __init__(self, device: VhostDevice, pci: PciBus, slot: int) -> None:
        super().__init__(0xFFFF, 0xFFFF, 0)
        self.device = device
        self._pci = pci
        self._slot = slot

    def _resolve(self) -> PciDevice | None:
        if not self.device.settled:
            log.debug("%s: guest access waits for the backend", self.device.name)
        function = self.device.wait()
        if function is None:
            return None
        self._pci.replace(self._slot, function)
        return function

    def config_read(self, offset: int, size: int) -> int:
        function = self._resolve()
        if function is None:
            return (1 << (8 * size)) - 1  # no device (the machine is stopping)
        return function.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        function = self._resolve()
        if function is not None:
            function.config_write(offset, size, value)

    def reset(self) -> None:
        """Nothing to reset before the function exists."""
