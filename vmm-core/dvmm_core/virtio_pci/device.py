"""A virtio-pci function (modern, virtio 1.2 section 4.1) for a vhost-user device.

Owns the PCI face of the device: IDs (1AF4:1040+type, revision 1), the
vendor capabilities that point into BAR 4 (common, notify, ISR, device,
PCI-cfg access), the MSI-X capability pointing into BAR 1, and following
BAR moves: the BAR ranges go on the MMIO bus and the doorbells become
ioeventfds at the new address.  Register semantics are the transport's.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from ..machine.bus import Bus, BusError
from ..machine.pci import PCI_INTERRUPT_LINE, BarKind, PciDevice
from .msix import MSIX_ENABLE, MSIX_FUNCTION_MASK
from .transport import (
    BAR1_SIZE,
    BAR4_SIZE,
    COMMON_OFFSET,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
    NOTIFY_OFFSET,
    REGION_SIZE,
    VirtioTransport,
)

log = logging.getLogger("dvmm.virtio_pci")

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
MSIX_BAR = 1
VIRTIO_BAR = 4
_CAP = struct.Struct("<BBBBxxII")  # cap_len, cfg_type, bar, id, pad, offset, length

# Class codes QEMU uses for each virtio device type (what guests expect).
CLASS_CODES = {1: 0x020000, 2: 0x010000, 16: 0x038000, 18: 0x098000}


class _BarWindow:
    """A BAR's range on the MMIO bus, forwarding to the transport."""

    def __init__(self, read: Callable[[int, int], int],
                 write: Callable[[int, int, int], None]) -> None:
        self._read, self._write = read, write

    def read(self, offset: int, size: int) -> int:
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, size, value)


class VirtioPciDevice(PciDevice):
    """A modern virtio-pci function whose device model is a vhost-user backend."""

    def __init__(self, device_type: int, transport: VirtioTransport, mmio: Bus) -> None:
        super().__init__(
            PCI_VENDOR_ID_REDHAT_QUMRANET, VIRTIO_PCI_DEVICE_ID_BASE + device_type,
            CLASS_CODES.get(device_type, 0xFF0000), revision=1,
            subsystem_vendor_id=PCI_VENDOR_ID_REDHAT_QUMRANET, subsystem_id=0x1100,
            interrupt_pin=1)
        self.transport = transport
        self.mmio = mmio
        transport.intx_gsi = lambda: self.config.get(PCI_INTERRUPT_LINE, 1)
        self.add_bar(MSIX_BAR, BAR1_SIZE, BarKind.MEM32)
        self.add_bar(VIRTIO_BAR, BAR4_SIZE, BarKind.MEM64, prefetch=True)
        self._add_virtio_caps()
        self.msix_cap = self._add_msix_cap()
        self._windows = {
            MSIX_BAR: _BarWindow(transport.bar1_read, transport.bar1_write),
            VIRTIO_BAR: _BarWindow(transport.bar4_read, transport.bar4_write),
        }
        self._on_bus: dict[int, int] = {}  # BAR index -> base its window is registered at

    def _add_virtio_caps(self) -> None:
        for cfg_type, offset in ((VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET),
                                 (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET),
                                 (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET)):
            body = _CAP.pack(_CAP.size + 2, cfg_type, VIRTIO_BAR, 0, offset, REGION_SIZE)
            self.config.add_capability(PCI_CAP_ID_VNDR, body)
        notify = _CAP.pack(_CAP.size + 6, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_BAR, 0,
                           NOTIFY_OFFSET, REGION_SIZE) + struct.pack("<I", NOTIFY_OFF_MULTIPLIER)
        self.config.add_capability(PCI_CAP_ID_VNDR, notify)
        # VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space
        # (bar, offset and length writable, then 4 data bytes).
        body = _CAP.pack(_CAP.size + 6, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0) + bytes(4)
        wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self.pci_cfg_cap = self.config.add_capability(PCI_CAP_ID_VNDR, body, wmask)

    def _add_msix_cap(self) -> int:
        vectors = self.transport.msix.vectors
        body = struct.pack("<HII", vectors - 1, MSIX_TABLE_OFFSET | MSIX_BAR,
                           MSIX_PBA_OFFSET | MSIX_BAR)
        wmask = struct.pack("<HII", MSIX_ENABLE | MSIX_FUNCTION_MASK, 0, 0)
        return self.config.add_capability(PCI_CAP_ID_MSIX, body, wmask)

    # -- config space side effects ----------------------------------------------
    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        control = self.config.get(self.msix_cap + 2, 2)
        self.transport.msix.set_control(control)
        data_at = self.pci_cfg_cap + 2 + _CAP.size
        if offset < data_at + 4 and data_at < offset + size:
            self._pci_cfg_access(write=True)

    def config_read(self, offset: int, size: int) -> int:
        data_at = self.pci_cfg_cap + 2 + _CAP.size
        if offset < data_at + 4 and data_at < offset + size:
            self._pci_cfg_access(write=False)
        return super().config_read(offset, size)

    def _pci_cfg_access(self, write: bool) -> None:
        """virtio 1.2 4.1.4.9: access ``length`` bytes of ``bar`` at ``offset``."""
        base = self.pci_cfg_cap + 2
        _len, _type, bar, _id, off, length = _CAP.unpack_from(self.config.data, base)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or off + length > BAR4_SIZE:
            return
        data_at = base + _CAP.size
        if write:
            value = int.from_bytes(self.config.data[data_at:data_at + length], "little")
            self.transport.bar4_write(off, length, value)
        else:
            value = self.transport.bar4_read(off, length)
            self.config.data[data_at:data_at + length] = value.to_bytes(length, "little")

    # -- BAR placement ------------------------------------------------------------
    def bar_changed(self, index: int, old: int | None, new: int | None) -> None:
        window = self._windows.get(index)
        if window is None:
            return
        size = BAR1_SIZE if index == MSIX_BAR else BAR4_SIZE
        registered = self._on_bus.pop(index, None)
        if registered is not None:
            self.mmio.unregister(registered)
        if new is not None:
            try:
                self.mmio.register(new, size, window, f"virtio-{index}@{new:#x}")
                self._on_bus[index] = new
            except BusError as exc:
                # The guest put this BAR over another range: undefined decoding
                # on hardware; here the BAR just does not decode (no VMM crash).
                log.warning("%s: BAR %d not decoded: %s", self.transport.name, index, exc)
        if index == VIRTIO_BAR:
            self.transport.bar4_moved(new)

    def reset(self) -> None:
        """Machine reset: the function returns to power-on state, the device too."""
        self.transport.device_reset()
        self.transport.msix.reset()
        super().reset()
