"""The Intel MultiProcessor table (MP spec 1.4, chapter 4) for direct Linux boot.

Owns telling a directly booted Linux where the CPUs and the IOAPIC are, and
how ISA interrupts reach it, without ACPI.  Placed at 0x9FC00 (the EBDA the
e820 map reserves), where Linux's mpparse scans.  Pure: returns bytes.
"""

from __future__ import annotations

import struct

MPTABLE_ADDR = 0x9FC00
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
APIC_VERSION = 0x14
IOAPIC_PINS = 24
CPU_ENABLED, CPU_BSP = 1, 2
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build(ncpus: int, addr: int = MPTABLE_ADDR) -> bytes:
    """Floating pointer + configuration table for ``ncpus`` CPUs (APIC IDs 0..n-1)."""
    ioapic_id = ncpus + 1
    entries = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBIIII", 0, cpu, APIC_VERSION, flags,
                                   0x600, 0x201, 0, 0))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, APIC_VERSION, 1, IOAPIC_ADDR))
    # ISA IRQ n -> IOAPIC pin n, matching KVM's default routing (GSI n ->
    # IOAPIC pin n), where the in-kernel PIT raises GSI 0 (Firecracker's
    # mptable.rs does the same).  QEMU's pin-2 timer override would need a
    # custom route for GSI 0.
    for irq in range(16):
        entries.append(struct.pack("<BBHBBBB", 3, MP_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", 4, MP_EXTINT, 0, 0, 0, 0, 0))
    entries.append(struct.pack("<BBHBBBB", 4, MP_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    # signature, length, spec, checksum, OEM, product, OEM table pointer and
    # size (none), entry count, local APIC address (MP 1.4 table 4-2).
    header = struct.pack("<4sHBB8s12sIHHI", b"PCMP", 44 + len(body), 4, 0,
                         b"DVMM    ", b"DVMM PC     ", 0, 0, len(entries), LAPIC_ADDR)
    header += bytes(4)  # extended table length, checksum, reserved
    table = bytearray(header + body)
    table[7] = _checksum(bytes(table))
    fp = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", addr + 16, 1, 4, 0, 0))
    fp[10] = _checksum(bytes(fp))
    return bytes(fp) + bytes(table)
