"""A KVM virtual machine: the VM fd and what is configured through it.

Owns guest-memory slots as KVM sees them (not the memory itself: that is a
memfd owned by the core's memory module), the in-kernel interrupt
controllers and PIT, GSI routing, irqfds, ioeventfds and vCPU creation.  It
keeps no routing table of its own: ``set_gsi_routing`` takes the whole table
because KVM replaces it whole (notes §2), so the caller's master list is
the only copy.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from typing import NamedTuple

from .ioctls import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_VCPU,
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQ_LINE,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
    KVM_SET_GSI_ROUTING,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SIGNAL_MSI,
    KvmError,
    KvmIoeventfd,
    KvmIrqfd,
    KvmIrqLevel,
    KvmIrqRoutingEntry,
    KvmMsi,
    KvmPitConfig,
    KvmUserspaceMemoryRegion,
    irq_routing_struct,
    kvm_ioctl,
)
from .vcpu import Vcpu

IOAPIC_PINS = 24
PAGE_SIZE = 4096


class IrqchipRoute(NamedTuple):
    """GSI → pin of an in-kernel interrupt controller (PIC master/slave, IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int

    def fill(self, e: KvmIrqRoutingEntry) -> None:
        e.gsi, e.type = self.gsi, KVM_IRQ_ROUTING_IRQCHIP
        e.u.irqchip.irqchip, e.u.irqchip.pin = self.irqchip, self.pin


class MsiRoute(NamedTuple):
    """GSI → MSI message (an MSI-X table entry copied straight; no device ID)."""

    gsi: int
    address_lo: int
    address_hi: int
    data: int

    def fill(self, e: KvmIrqRoutingEntry) -> None:
        e.gsi, e.type = self.gsi, KVM_IRQ_ROUTING_MSI
        m = e.u.msi
        m.address_lo, m.address_hi, m.data = self.address_lo, self.address_hi, self.data


class Vm:
    """An open KVM VM fd (created by ``Kvm.create_vm``)."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.has_irqchip = False
        self.vcpus: list[Vcpu] = []

    def check_extension(self, cap: int) -> int:
        """Per-VM KVM_CHECK_EXTENSION (same answers as the system fd on x86)."""
        return kvm_ioctl(self._checked_fd(), KVM_CHECK_EXTENSION, cap)

    # --- platform -------------------------------------------------------------

    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and per-vCPU LAPICs; before any vCPU."""
        kvm_ioctl(self._checked_fd(), KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """In-kernel i8254 on GSI 0.  SPEAKER_DUMMY keeps port 0x61 in the kernel:
        without it SeaBIOS calibrates the TSC wrong (notes seabios §2)."""
        cfg = KvmPitConfig(flags=KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0)
        kvm_ioctl(self._checked_fd(), KVM_CREATE_PIT2, cfg)

    def set_tss_addr(self, addr: int) -> None:
        """Three pages of guest-physical space KVM/VMX uses for real mode."""
        kvm_ioctl(self._checked_fd(), KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """One page for the VMX real-mode identity map; only before any vCPU exists."""
        if self.vcpus:
            raise KvmError("KVM_SET_IDENTITY_MAP_ADDR: must precede vCPU creation",
                           errno.EINVAL)
        kvm_ioctl(self._checked_fd(), KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int,
                               readonly: bool = False) -> None:
        """Map (or with ``size`` 0 delete) slot ``slot``; addresses 4 KiB aligned."""
        if (guest_addr | size | host_addr) % PAGE_SIZE:
            raise KvmError(f"KVM_SET_USER_MEMORY_REGION: slot {slot} gpa={guest_addr:#x} "
                           f"size={size:#x} host={host_addr:#x} is not page aligned",
                           errno.EINVAL)
        region = KvmUserspaceMemoryRegion(slot=slot, flags=KVM_MEM_READONLY if readonly else 0,
                                          guest_phys_addr=guest_addr, memory_size=size,
                                          userspace_addr=host_addr)
        kvm_ioctl(self._checked_fd(), KVM_SET_USER_MEMORY_REGION, region)

    # --- interrupts -----------------------------------------------------------

    def irq_line(self, gsi: int, level: bool) -> None:
        """Drive GSI ``gsi`` to ``level`` through the routing table."""
        kvm_ioctl(self._checked_fd(), KVM_IRQ_LINE, KvmIrqLevel(irq=gsi, level=int(level)))

    @staticmethod
    def default_routes() -> list[IrqchipRoute]:
        """KVM's routing after CREATE_IRQCHIP (linux arch/x86/kvm, default_routing):
        GSI 0-15 to IOAPIC pin n and PIC pin n%8, GSI 16-23 to the IOAPIC only."""
        routes = []
        for gsi in range(IOAPIC_PINS):
            if gsi < 16:
                chip = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
                routes.append(IrqchipRoute(gsi, chip, gsi % 8))
            routes.append(IrqchipRoute(gsi, KVM_IRQCHIP_IOAPIC, gsi))
        return routes

    def set_gsi_routing(self, routes: Sequence[IrqchipRoute | MsiRoute]) -> None:
        """Replace KVM's whole GSI routing table with ``routes``."""
        table = irq_routing_struct(len(routes))()
        table.nr = len(routes)
        for route, entry in zip(routes, table.entries, strict=True):
            route.fill(entry)
        kvm_ioctl(self._checked_fd(), KVM_SET_GSI_ROUTING, table)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """Signalling eventfd ``fd`` injects GSI ``gsi`` (edge) without a VM exit."""
        req = KvmIrqfd(fd=fd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        kvm_ioctl(self._checked_fd(), KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """A guest write to ``addr`` (``length`` bytes, 0 = any) signals ``fd``
        instead of exiting; with ``datamatch`` only writes of that value do."""
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        req = KvmIoeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        kvm_ioctl(self._checked_fd(), KVM_IOEVENTFD, req)

    def signal_msi(self, address_lo: int, address_hi: int, data: int) -> int:
        """Inject one MSI; 1 when delivered, 0 when blocked (LAPIC disabled, no CPU)."""
        msi = KvmMsi(address_lo=address_lo, address_hi=address_hi, data=data)
        return kvm_ioctl(self._checked_fd(), KVM_SIGNAL_MSI, msi)

    # --- vCPUs and lifetime ---------------------------------------------------

    def create_vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` (also its APIC ID; index 0 is the bootstrap processor)."""
        fd = kvm_ioctl(self._checked_fd(), KVM_CREATE_VCPU, index)
        try:
            vcpu = Vcpu(self, fd, index, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def _checked_fd(self) -> int:
        if self.fd < 0:
            raise KvmError("VM is closed", errno.EBADF)
        return self.fd

    def close(self) -> None:
        """Close every vCPU, then the VM fd (the kernel frees the VM with the last fd)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
