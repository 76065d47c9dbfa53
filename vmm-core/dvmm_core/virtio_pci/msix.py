"""MSI-X for a virtio-pci device: the table, the PBA, and what they mean to KVM.

Owns the MSI-X table (16-byte entries: address low/high, data, vector
control) and the capability's enable / function-mask bits (PCI 3.0 6.8.2).
It computes, for each vector, whether it can currently deliver, and reports
changes through ``on_change`` so the transport can re-route interrupts:
each usable vector becomes a KVM MSI route on its own GSI, with the
backend's call eventfd bound to it through irqfd.  It does not talk to KVM.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

ENTRY = struct.Struct("<IIII")
ENTRY_SIZE = ENTRY.size
VECTOR_CTL_MASK = 1
MSIX_ENABLE = 1 << 15
MSIX_FUNCTION_MASK = 1 << 14


@dataclass(frozen=True)
class MsiMessage:
    address_lo: int
    address_hi: int
    data: int


class MsixTable:
    """The table and PBA of one function, plus its message-control bits."""

    def __init__(self, vectors: int, on_change: Callable[[], None]) -> None:
        self.vectors = vectors
        self._table = bytearray(ENTRY_SIZE * vectors)
        for v in range(vectors):  # entries start masked (6.8.2.9)
            ENTRY.pack_into(self._table, v * ENTRY_SIZE, 0, 0, 0, VECTOR_CTL_MASK)
        self.enabled = False
        self.function_masked = False
        self._on_change = on_change

    @property
    def table_bytes(self) -> int:
        return len(self._table)

    def message(self, vector: int) -> MsiMessage | None:
        """The message for ``vector`` if it can be delivered now, else None."""
        if not self.enabled or self.function_masked or not 0 <= vector < self.vectors:
            return None
        lo, hi, data, ctl = ENTRY.unpack_from(self._table, vector * ENTRY_SIZE)
        if ctl & VECTOR_CTL_MASK:
            return None
        return MsiMessage(lo, hi, data)

    def read_table(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self._table):
            return 0
        return int.from_bytes(self._table[offset:offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self._table) or size not in (1, 2, 4, 8):
            return
        before = bytes(self._table)
        self._table[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(
            size, "little")
        if bytes(self._table) != before:
            self._on_change()

    def read_pba(self, offset: int, size: int) -> int:
        # Pending bits are held in the call eventfds while a vector is masked
        # (they fire when it is unmasked), so the PBA reads as zero.
        return 0

    def set_control(self, message_control: int) -> None:
        enabled = bool(message_control & MSIX_ENABLE)
        masked = bool(message_control & MSIX_FUNCTION_MASK)
        if (enabled, masked) != (self.enabled, self.function_masked):
            self.enabled, self.function_masked = enabled, masked
            self._on_change()

    def reset(self) -> None:
        self.__init__(self.vectors, self._on_change)  # type: ignore[misc]
