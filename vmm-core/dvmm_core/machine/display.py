"""The machine's display: the display process, its link, and ramfb.

Owns the core's side of ``dvmm run --display vnc=HOST:PORT``
(``notes/display_interface.md``):

* the display process, ``python -m dvmm_display --socket S --control C
  --vnc HOST:PORT [--password-file F] --core-control ipc://RUNTIME/core.ctl``,
  is a backend like any other: the machine spawns it through its supervisor
  (name ``display0``, the machine's restart policy), before the VM exists;
* its vhost-user link carries only the memory table when the machine has no
  virtio-gpu function: the display process maps guest RAM (the memfd) and
  scans the framebuffer out of it -- the core never copies a pixel.  The
  link connects on its own thread once the vCPUs run (as ``vhost_devices``
  does for a PCI device), and reconnects after a restart like every link;
* with ``gpu=virtio`` the same process also serves the virtio-gpu-pci
  function (1af4:1050): the machine plugs it as any vhost device
  (``vhost_devices``: transport, MSI-X, ioeventfd kicks, reconnection), and
  that device's link is the display's link -- one vhost-user connection;
* the ramfb configuration the guest writes (``ramfb``) goes to the display
  process as the ``ramfb`` control command -- from a sender thread, never
  from the vCPU that wrote it -- and again after every restart of the
  display process (the link's ``device-restored`` event), so a restarted
  display shows the same screen without the guest doing anything.

Key and pointer events travel the other way, display -> core
``input`` command -> ``i8042``; this module does not see them.  With
``input=virtio`` the display process also serves a virtio keyboard and
tablet (vhost-user-input, sockets of their own: :func:`input_sockets`),
which the machine plugs as virtio-input-pci functions (1af4:1052); VNC
input goes there once a guest driver runs them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .ramfb import RamfbConfig

if TYPE_CHECKING:
    from dvmm_shared.memory import GuestMemory

    from ..supervisor import Backend, Supervisor
    from ..vhost_user_frontend import RamRegion, VhostUserLink
    from .vhost_devices import VhostDevice

log = logging.getLogger("dvmm.display")

DISPLAY_NAME = "display0"
DISPLAY_MODULE = "dvmm_display"
SOCKET_WAIT = 15.0   # the display process imports more than a disk backend
SEND_RETRY = 0.2     # a control command the display could not take yet
SEND_TIMEOUT = 2.0
INPUT_CONFIG_SIZE = 136  # struct virtio_input_config (virtio 1.2 5.8.4)


@dataclass(frozen=True)
class DisplaySpec:
    """``--display vnc=HOST:PORT[,password-file=F][,gpu=virtio][,input=virtio]``."""

    vnc: str
    password_file: str | None = None
    gpu: str | None = None  # "virtio": a virtio-gpu-pci function served by the display
    input: str | None = None  # "virtio": virtio-input keyboard + tablet functions too

    def backend_args(self, core_control: str, inputs: dict[str, str] | None = None
                     ) -> list[str]:
        args = ["--vnc", self.vnc, "--core-control", core_control]
        if self.password_file is not None:
            args += ["--password-file", self.password_file]
        if inputs:
            args += ["--input-socket", inputs["keyboard"], "--tablet-socket", inputs["tablet"]]
        return args


def input_sockets(socket_path: Callable[[str], str]) -> dict[str, str]:
    """Device name -> socket of the display process's virtio-input devices
    (``socket_path``: the supervisor's, a name to a path in the runtime dir)."""
    return {"keyboard": socket_path(f"{DISPLAY_NAME}-kbd"),
            "tablet": socket_path(f"{DISPLAY_NAME}-tablet")}


class DisplayHost(Protocol):
    """What the display needs from the machine (``Machine`` fits)."""

    supervisor: Supervisor
    links: dict[str, VhostUserLink]

    def ram_regions(self) -> list[RamRegion]: ...
    def guest_memory(self) -> GuestMemory: ...
    def publish(self, event: str, fields: dict[str, Any]) -> None: ...
    def start_failed(self, reason: str) -> None: ...


class DisplayLink:
    """The running display process as the core sees it: its vhost-user link
    (memory table only, or the virtio-gpu ``device``'s) and the ramfb
    configuration it must show."""

    def __init__(self, host: DisplayHost, backend: Backend, name: str = DISPLAY_NAME,
                 device: VhostDevice | None = None) -> None:
        self.host = host
        self.backend = backend
        self.name = name
        self.device = device
        self.link: VhostUserLink | None = None
        self.sent: RamfbConfig | None = None  # what the display process last accepted
        self._config: RamfbConfig | None = None
        self._cond = threading.Condition()
        self._dirty = False
        self._connected = False
        self._closed = False
        self._threads: list[threading.Thread] = []

    def begin(self) -> None:
        """Connect the link and start the sender (the vCPUs already run)."""
        for target, what in ((self._connect, "start"), (self._send_loop, "send")):
            thread = threading.Thread(target=target, name=f"{what}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- the link ---------------------------------------------------------------
    def _connect(self) -> None:
        if self.device is not None:
            self._adopt(self.device)
            return
        from ..supervisor import SupervisorError
        from ..vhost_user_frontend import LinkDown, VhostUserLink

        host = self.host
        try:
            host.supervisor.wait_for_socket(self.backend, SOCKET_WAIT,
                                            cancelled=lambda: self._closed)
            link = VhostUserLink(self.name, self.backend.socket, host.ram_regions(),
                                 mem=host.guest_memory(), on_event=host.publish)
            with self._cond:
                if self._closed:
                    return
                self.link = link
                host.links[self.name] = link
            link.connect(timeout=10.0)
        except (LinkDown, SupervisorError, OSError) as exc:
            if not self._closed:
                host.start_failed(f"display: {exc}")
            return
        with self._cond:
            self._connected = True
            self._cond.notify_all()

    def _adopt(self, device: VhostDevice) -> None:
        """The virtio-gpu device's connector brings the link up (and reports
        its failure itself); the display only waits for it."""
        if device.wait() is None:
            return
        with self._cond:
            self.link = device.link
            self._connected = True
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the link came up within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected, timeout)

    # -- ramfb ------------------------------------------------------------------
    def show(self, config: RamfbConfig) -> None:
        """The guest wrote a valid ramfb config (vCPU thread): never blocks
        beyond a lock; the sender thread delivers it."""
        with self._cond:
            self._config, self._dirty = config, True
            self._cond.notify_all()

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        """Every machine event; a restored display link gets the screen again."""
        if event == "device-restored" and fields.get("name") == self.name:
            with self._cond:
                self._dirty = self._config is not None
                self._cond.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._dirty and self._connected):
                    self._cond.wait()
                if self._closed:
                    return
                config, self._dirty = self._config, False
            assert config is not None
            if not self._send(config):
                with self._cond:
                    self._dirty = True  # unless a newer one is already waiting, retry it
                    self._cond.wait(SEND_RETRY)

    def _send(self, config: RamfbConfig) -> bool:
        from dvmm_shared.control import ControlError, command

        endpoint = self.backend.control
        if endpoint is None:
            return True
        try:
            command(endpoint, "ramfb", timeout=SEND_TIMEOUT, **config.command_args())
        except ControlError as exc:
            log.debug("%s: ramfb not delivered yet: %s", self.name, exc)
            return False
        self.sent = config
        log.info("%s: showing ramfb %dx%d at %#x", self.name, config.width, config.height,
                 config.addr)
        return True

    # -- stopping -----------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=15)
        if self.link is not None and self.device is None:  # else the device closes it
            self.link.close()
