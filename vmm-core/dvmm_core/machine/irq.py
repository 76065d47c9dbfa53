"""Interrupt routing: the master GSI table the core keeps for KVM.

KVM_SET_GSI_ROUTING replaces the whole table, so the core keeps the full
list (the default irqchip routes for GSI 0-23 that the PIT, serial and INTx
use, plus one MSI route per live MSI-X vector) and resubmits it whole on
every change (notes: kvm-and-linux-boot.md section 2).  GSIs for MSI start
at 24.  Also binds eventfds to GSIs (irqfd) and tracks them so a route can
be torn down in the order KVM needs: deassign the irqfd, then drop the route.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

FIRST_MSI_GSI = 24
MAX_GSI = 4096


class MsiRouteSpec(NamedTuple):
    gsi: int
    address_lo: int
    address_hi: int
    data: int


class IrqRouter:
    """Owns GSI numbers >= 24, the MSI routes on them, and irqfd bindings."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self._free = list(range(MAX_GSI - 1, FIRST_MSI_GSI - 1, -1))
        self._msi: dict[int, MsiRouteSpec] = {}
        self._irqfds: dict[int, int] = {}  # eventfd -> gsi
        self._lock = threading.Lock()

    def attach(self, vm: Any) -> None:
        """A new VM instance (after a reset): resubmit every route and irqfd."""
        with self._lock:
            self.vm = vm
            self._commit()
            for fd, gsi in self._irqfds.items():
                vm.irqfd(fd, gsi)

    def allocate(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("out of GSIs")
            return self._free.pop()

    def release(self, gsi: int) -> None:
        """Give an allocated GSI back, dropping its MSI route."""
        with self._lock:
            if gsi < FIRST_MSI_GSI or gsi in self._free:
                raise ValueError(f"GSI {gsi} was not allocated")
            if self._msi.pop(gsi, None) is not None and self.vm is not None:
                self._commit()
            self._free.append(gsi)

    def set_msi(self, gsi: int, address_lo: int, address_hi: int, data: int) -> None:
        spec = MsiRouteSpec(gsi, address_lo, address_hi, data)
        with self._lock:
            if self._msi.get(gsi) != spec:
                self._msi[gsi] = spec
                self._commit()

    def clear_msi(self, gsi: int) -> None:
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._commit()

    def bind(self, fd: int, gsi: int) -> None:
        with self._lock:
            if self._irqfds.get(fd) == gsi:
                return
            if fd in self._irqfds:
                self.vm.irqfd(fd, self._irqfds.pop(fd), deassign=True)
            self.vm.irqfd(fd, gsi)
            self._irqfds[fd] = gsi

    def unbind(self, fd: int) -> None:
        with self._lock:
            gsi = self._irqfds.pop(fd, None)
            if gsi is not None:
                self.vm.irqfd(fd, gsi, deassign=True)

    def irq_line(self, gsi: int, level: bool) -> None:
        self.vm.irq_line(gsi, level)

    def _commit(self) -> None:
        from ..kvm import MsiRoute

        routes: list[Any] = list(self.vm.default_routes())
        routes += [MsiRoute(r.gsi, r.address_lo, r.address_hi, r.data)
                   for r in self._msi.values()]
        self.vm.set_gsi_routing(routes)
