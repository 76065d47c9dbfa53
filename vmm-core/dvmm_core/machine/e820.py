"""The PC memory map: where RAM goes, and the e820 table that describes it.

Owns the layout decisions: RAM from 0 up to the start of the 32-bit PCI
hole (3 GiB), the rest of RAM from 4 GiB up, and the reserved pieces the
firmware and KVM need (the legacy VGA/BIOS area, KVM's TSS and identity-map
pages, the BIOS image below 4 GiB).  The same :class:`RamLayout` feeds the
KVM memory slots, the vhost-user memory table and the e820 map.
"""

from __future__ import annotations

from typing import NamedTuple

E820_RAM = 1
E820_RESERVED = 2

GIB = 1 << 30
MIB = 1 << 20
PCI_HOLE_START = 3 * GIB           # 32-bit MMIO window: 0xC0000000 .. 0xFEC00000
HIGH_RAM_START = 4 * GIB
KVM_IDENTITY_MAP_ADDR = 0xFEFFC000  # one page, then the 3-page TSS
KVM_TSS_ADDR = 0xFEFFD000
KVM_PRIVATE_SIZE = 0x4000
EBDA_START = 0x9FC00
LEGACY_HOLE_END = 0x100000


class E820Entry(NamedTuple):
    addr: int
    size: int
    kind: int


class RamChunk(NamedTuple):
    """A piece of guest RAM: guest address, size, and offset in the RAM memfd."""

    guest_addr: int
    size: int
    fd_offset: int


class RamLayout(NamedTuple):
    total: int

    @property
    def low_size(self) -> int:
        return min(self.total, PCI_HOLE_START)

    @property
    def high_size(self) -> int:
        return self.total - self.low_size

    @property
    def chunks(self) -> list[RamChunk]:
        out = [RamChunk(0, self.low_size, 0)]
        if self.high_size:
            out.append(RamChunk(HIGH_RAM_START, self.high_size, self.low_size))
        return out

    def e820(self, firmware: bool) -> list[E820Entry]:
        """The map handed to firmware (fw_cfg etc/e820) or to Linux (zero page).

        Firmware gets plain RAM ranges and builds the legacy holes itself;
        Linux, booted directly, is told about the EBDA/BIOS hole too.
        """
        if firmware:
            entries = [E820Entry(0, self.low_size, E820_RAM)]
        else:
            entries = [E820Entry(0, EBDA_START, E820_RAM),
                       E820Entry(EBDA_START, LEGACY_HOLE_END - EBDA_START, E820_RESERVED),
                       E820Entry(LEGACY_HOLE_END, self.low_size - LEGACY_HOLE_END, E820_RAM)]
        entries.append(E820Entry(KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_SIZE, E820_RESERVED))
        if self.high_size:
            entries.append(E820Entry(HIGH_RAM_START, self.high_size, E820_RAM))
        return entries
