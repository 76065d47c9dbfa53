"""The virtio-pci modern transport for a vhost-user device (virtio 1.2 4.1).

Owns the device's BAR contents and what the guest's accesses to them mean:

* BAR 4 (64-bit memory, 16 KiB): common config at 0x0000, ISR at 0x1000,
  device config at 0x2000 (forwarded to the backend: GET_CONFIG/SET_CONFIG),
  notify area at 0x3000 (queue q's doorbell at 0x3000 + 4q);
* BAR 1 (32-bit memory, 4 KiB): the MSI-X table at 0x000 and PBA at 0x800.

The data path never comes here.  Each doorbell is a KVM ioeventfd bound to
the backend's kick eventfd, and each MSI-X vector a KVM MSI route with the
backend's call eventfd bound through irqfd.  Only when MSI-X is off (the
firmware's INTx mode) does the core watch the call eventfds itself, set the
ISR bit and raise the INTx line.  A doorbell write that reaches us (no
ioeventfd yet) is forwarded to the kick eventfd by hand.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from dvmm_shared.eventfd import EventFd

from ..machine.irq import IrqRouter
from ..vhost_user_frontend import LinkDown, QueueStart, VhostUserLink
from .common_cfg import VIRTIO_MSI_NO_VECTOR, CommonConfig, QueueConfig, StatusEvent
from .msix import MsixTable

log = logging.getLogger("dvmm.virtio_pci")

COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
REGION_SIZE = 0x1000
BAR4_SIZE = 0x4000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
BAR1_SIZE = 0x1000
ISR_QUEUE = 1
ISR_CONFIG = 2


class IoeventfdHost(Protocol):
    """What the transport needs from the VM to place doorbells."""

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None: ...


class IntxPump(Protocol):
    """Machine service that watches call eventfds of devices in INTx mode."""

    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int) -> None: ...


class VirtioTransport:
    """Register semantics of one virtio-pci function backed by a vhost-user link."""

    def __init__(self, name: str, link: VhostUserLink, router: IrqRouter,
                 vm: IoeventfdHost, pump: IntxPump, *, queue_max_size: int = 256,
                 offered_mask: int = ~0) -> None:
        self.name = name
        self.link = link
        self.router = router
        self.vm = vm
        self.pump = pump
        nq = link.num_queues
        self.common = CommonConfig(link.device_features & offered_mask,
                                   [QueueConfig(queue_max_size) for _ in range(nq)])
        self.msix = MsixTable(nq + 1, self.reroute)
        self.kicks = [EventFd() for _ in range(nq)]
        self.calls = [EventFd() for _ in range(nq)]
        # The configuration-change interrupt (4.1.5.3): an eventfd bound like a
        # queue's call when MSI-X routes msix_config, else ISR bit 1 + INTx.
        self.config_call = EventFd()
        link.on_config_change = self.config_changed
        self.isr = 0
        self.intx_gsi: Callable[[], int] = lambda: -1
        self._vector_gsi: dict[int, int] = {}
        self._notify_base: int | None = None
        self._intx_level = False
        self._pumped: set[int] = set()
        # ISR and the INTx level change on the pump thread (a call eventfd fired)
        # and on a vCPU (ISR read): both updates must be atomic or an interrupt
        # is lost (ISR set, line low).
        self._isr_lock = threading.Lock()

    # -- BAR 4 --------------------------------------------------------------
    def bar4_read(self, offset: int, size: int) -> int:
        region, off = divmod(offset, REGION_SIZE)
        if region == 0:
            return self.common.read(off, size)
        if region == 1:
            return self._read_isr() if off == 0 else 0
        if region == 2:
            return self._read_device_config(off, size)
        return 0

    def bar4_write(self, offset: int, size: int, value: int) -> None:
        region, off = divmod(offset, REGION_SIZE)
        if region == 0:
            self._status_event(self.common.write(off, size, value))
        elif region == 2:
            self._write_device_config(off, size, value)
        elif region == 3:
            self._doorbell(off // NOTIFY_OFF_MULTIPLIER)

    def _read_isr(self) -> int:
        with self._isr_lock:
            value, self.isr = self.isr, 0  # reading ISR clears it (4.1.4.5)
            self._set_intx(False)
        return value

    def _read_device_config(self, off: int, size: int) -> int:
        try:
            return int.from_bytes(self.link.get_config(off, size), "little")
        except LinkDown as exc:
            log.warning("%s: config read: %s", self.name, exc)
            return (1 << 8 * size) - 1

    def _write_device_config(self, off: int, size: int, value: int) -> None:
        try:
            self.link.set_config(off, value.to_bytes(size, "little"))
        except LinkDown as exc:
            log.warning("%s: config write: %s", self.name, exc)

    def _doorbell(self, queue: int) -> None:
        if 0 <= queue < len(self.kicks):
            self.kicks[queue].signal()

    # -- BAR 1: MSI-X ---------------------------------------------------------
    def bar1_read(self, offset: int, size: int) -> int:
        if offset >= MSIX_PBA_OFFSET:
            return self.msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        return self.msix.read_table(offset, size)

    def bar1_write(self, offset: int, size: int, value: int) -> None:
        if offset < MSIX_PBA_OFFSET:
            self.msix.write_table(offset, size, value)

    # -- lifecycle ------------------------------------------------------------
    def _status_event(self, event: StatusEvent) -> None:
        if event is StatusEvent.RESET:
            self.device_reset()
        elif event is StatusEvent.DRIVER_OK:
            self._driver_ok()
        elif event is StatusEvent.FAILED:
            log.warning("%s: the driver gave up on the device (FAILED)", self.name)

    def _driver_ok(self) -> None:
        starts = [QueueStart(i, q.size, q.desc, q.driver, q.device,
                             self.kicks[i].fd, self.calls[i].fd)
                  for i, q in enumerate(self.common.queues) if q.enabled]
        self.reroute()
        try:
            self.link.start(self.common.driver_features, starts)
        except LinkDown as exc:
            log.error("%s: cannot start the device: %s", self.name, exc)
            self.common.needs_reset()

    def device_reset(self) -> None:
        """Status 0 (or a machine reset): stop the rings, drop interrupt routes."""
        try:
            self.link.stop()
        except LinkDown as exc:
            log.warning("%s: reset: %s", self.name, exc)
        self.common.reset()
        with self._isr_lock:
            self.isr = 0
            self._set_intx(False)
        self.reroute()

    # -- interrupts -------------------------------------------------------------
    def reroute(self) -> None:
        """Point each queue's call eventfd where the guest now wants interrupts."""
        for i, q in enumerate(self.common.queues):
            fd = self.calls[i].fd
            if self.msix.enabled:
                self._unpump(fd)
                msg = self.msix.message(q.msix_vector)
                if msg is None:
                    self.router.unbind(fd)  # masked: signals wait in the eventfd
                    continue
                gsi = self._gsi_for(q.msix_vector)
                self.router.set_msi(gsi, msg.address_lo, msg.address_hi, msg.data)
                self.router.bind(fd, gsi)
            else:
                self.router.unbind(fd)
                if fd not in self._pumped:
                    self._pumped.add(fd)
                    self.pump.watch(fd, self._intx_fire)

        fd = self.config_call.fd
        msg = self.msix.message(self.common.msix_config) if self.msix.enabled else None
        if msg is None:
            self.router.unbind(fd)  # masked or no vector: a signal waits in the eventfd
        else:
            gsi = self._gsi_for(self.common.msix_config)
            self.router.set_msi(gsi, msg.address_lo, msg.address_hi, msg.data)
            self.router.bind(fd, gsi)

    def config_changed(self) -> None:
        """The backend's config space changed: new config_generation, and a
        configuration-change notification to the driver (virtio 1.2 4.1.5.3)."""
        self.common.generation += 1
        if self.msix.enabled:
            if self.common.msix_config != VIRTIO_MSI_NO_VECTOR:
                self.config_call.signal()
            return
        with self._isr_lock:
            self.isr |= ISR_CONFIG
            self._set_intx(True)

    def _gsi_for(self, vector: int) -> int:
        if vector not in self._vector_gsi:
            self._vector_gsi[vector] = self.router.allocate()
        return self._vector_gsi[vector]

    def _unpump(self, fd: int) -> None:
        if fd in self._pumped:
            self._pumped.discard(fd)
            self.pump.unwatch(fd)

    def _intx_fire(self) -> None:
        with self._isr_lock:
            self.isr |= ISR_QUEUE
            self._set_intx(True)

    def _set_intx(self, level: bool) -> None:
        gsi = self.intx_gsi()
        # 0 (the timer's line) and 0xFF mean the firmware never routed INTx.
        if level != self._intx_level and 0 < gsi < 24:
            self.router.irq_line(gsi, level)
        self._intx_level = level

    # -- doorbells ----------------------------------------------------------
    def bar4_moved(self, new_base: int | None) -> None:
        """Place the queue doorbells (ioeventfds) at the BAR's new address."""
        old, self._notify_base = self._notify_base, (
            None if new_base is None else new_base + NOTIFY_OFFSET)
        for i, kick in enumerate(self.kicks):
            if old is not None:
                self._ioeventfd(kick.fd, old + NOTIFY_OFF_MULTIPLIER * i, deassign=True)
            if self._notify_base is not None:
                self._ioeventfd(kick.fd, self._notify_base + NOTIFY_OFF_MULTIPLIER * i)

    def _ioeventfd(self, fd: int, addr: int, deassign: bool = False) -> None:
        try:
            self.vm.ioeventfd(fd, addr, 0, deassign=deassign)
        except OSError as exc:
            log.warning("%s: ioeventfd at %#x: %s (doorbells will trap)", self.name, addr, exc)

    def attach_vm(self, vm: Any) -> None:
        """A new VM instance after a machine reset: doorbells are re-placed by the
        firmware assigning BARs again, so only forget the old ones."""
        self.vm = vm
        self._notify_base = None

    def close(self) -> None:
        for fd in list(self._pumped):
            self._unpump(fd)
        self.link.on_config_change = None
        for efd in (*self.kicks, *self.calls, self.config_call):
            self.router.unbind(efd.fd) if efd in self.calls or efd is self.config_call else None
            efd.close()
