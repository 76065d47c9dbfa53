"""The PC memory map (RamLayout, e820) and the MP table for direct Linux boot."""

from __future__ import annotations

import itertools
import struct

import pytest
from dvmm_core.machine import mptable
from dvmm_core.machine.e820 import (
    E820_RAM,
    E820_RESERVED,
    KVM_IDENTITY_MAP_ADDR,
    KVM_TSS_ADDR,
    E820Entry,
    RamChunk,
    RamLayout,
)

MIB, GIB = 1 << 20, 1 << 30


# -- RamLayout and e820 ---------------------------------------------------------------
@pytest.mark.parametrize("total,chunks", [
    (256 * MIB, [RamChunk(0, 256 * MIB, 0)]),
    (3 * GIB, [RamChunk(0, 3 * GIB, 0)]),
    (5 * GIB, [RamChunk(0, 3 * GIB, 0), RamChunk(4 * GIB, 2 * GIB, 3 * GIB)]),
    (3 * GIB + 4096, [RamChunk(0, 3 * GIB, 0), RamChunk(4 * GIB, 4096, 3 * GIB)]),
])
def test_ram_is_split_around_the_pci_hole(total: int, chunks: list[RamChunk]) -> None:
    layout = RamLayout(total)
    assert layout.chunks == chunks
    assert layout.low_size + layout.high_size == total
    assert sum(c.size for c in layout.chunks) == total
    # The memfd is used without gaps: each chunk starts where the last ended.
    offset = 0
    for chunk in layout.chunks:
        assert chunk.fd_offset == offset
        offset += chunk.size


def check_map(entries: list[E820Entry]) -> None:
    """Sorted, non-overlapping, non-empty, and KVM's private pages reserved."""
    for e in entries:
        assert e.size > 0 and e.kind in (E820_RAM, E820_RESERVED)
    for a, b in itertools.pairwise(entries):
        assert a.addr + a.size <= b.addr, f"{a} overlaps or precedes {b}"
    for page in (KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, KVM_TSS_ADDR + 0x2000):
        covering = [e for e in entries if e.addr <= page and page + 4096 <= e.addr + e.size]
        assert [e.kind for e in covering] == [E820_RESERVED], hex(page)


def ram_bytes(entries: list[E820Entry]) -> int:
    return sum(e.size for e in entries if e.kind == E820_RAM)


@pytest.mark.parametrize("total", [256 * MIB, 3 * GIB, 5 * GIB])
def test_firmware_e820(total: int) -> None:
    layout = RamLayout(total)
    entries = layout.e820(firmware=True)
    check_map(entries)
    assert entries[0] == E820Entry(0, layout.low_size, E820_RAM)
    assert ram_bytes(entries) == total
    high = [e for e in entries if e.addr >= 4 * GIB]
    assert high == ([E820Entry(4 * GIB, 2 * GIB, E820_RAM)] if total > 3 * GIB else [])


@pytest.mark.parametrize("total", [256 * MIB, 3 * GIB, 5 * GIB])
def test_direct_boot_e820(total: int) -> None:
    layout = RamLayout(total)
    entries = layout.e820(firmware=False)
    check_map(entries)
    assert entries[:3] == [
        E820Entry(0, 0x9FC00, E820_RAM),                   # conventional memory
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),  # EBDA, VGA, BIOS
        E820Entry(0x100000, layout.low_size - 0x100000, E820_RAM),
    ]
    # Everything but the legacy hole is RAM.
    assert ram_bytes(entries) == total - (0x100000 - 0x9FC00)
    assert all(e.addr + e.size <= 3 * GIB or e.addr >= 0xFEC00000 for e in entries)


def test_ram_never_overlaps_kvm_pages_or_the_pci_hole() -> None:
    for total in (256 * MIB, 3 * GIB, 5 * GIB, 64 * GIB):
        for chunk in RamLayout(total).chunks:
            end = chunk.guest_addr + chunk.size
            assert end <= 3 * GIB or chunk.guest_addr >= 4 * GIB
            assert not chunk.guest_addr <= KVM_IDENTITY_MAP_ADDR < end


# -- MP table ------------------------------------------------------------------------------
def checksum_ok(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


def parse(ncpus: int, addr: int = mptable.MPTABLE_ADDR) -> tuple[bytes, bytes, list[bytes]]:
    """(floating pointer, table, entries) of a built MP table."""
    data = mptable.build(ncpus, addr)
    fp, table = data[:16], data[16:]
    entries, off = [], 44
    while off < len(table):
        size = 20 if table[off] == 0 else 8
        entries.append(table[off:off + size])
        off += size
    assert off == len(table)
    return fp, table, entries


@pytest.mark.parametrize("ncpus", [1, 2, 4, 16])
def test_floating_pointer(ncpus: int) -> None:
    fp, _, _ = parse(ncpus)
    assert fp[:4] == b"_MP_"
    assert checksum_ok(fp)
    physptr, length, spec = struct.unpack_from("<IBB", fp, 4)
    assert physptr == mptable.MPTABLE_ADDR + 16  # the table follows the pointer
    assert (length, spec) == (1, 4)  # one 16-byte paragraph, MP 1.4
    assert fp[11:16] == bytes(5)  # no default configuration: the table is used


@pytest.mark.parametrize("ncpus", [1, 2, 4, 16])
def test_configuration_table_header(ncpus: int) -> None:
    _, table, entries = parse(ncpus)
    sig, length, spec, _ = struct.unpack_from("<4sHBB", table)
    assert (sig, spec) == (b"PCMP", 4)
    assert length == len(table)
    assert checksum_ok(table[:length])
    oem_pointer, oem_size, count = struct.unpack_from("<IHH", table, 28)
    assert (oem_pointer, oem_size) == (0, 0)  # no OEM table
    assert count == len(entries)
    assert struct.unpack_from("<I", table, 36)[0] == 0xFEE00000  # local APIC


def test_pointer_follows_the_address_it_is_built_for() -> None:
    fp, _, _ = parse(2, addr=0xF0000)
    assert struct.unpack_from("<I", fp, 4)[0] == 0xF0010
    assert checksum_ok(fp)


@pytest.mark.parametrize("ncpus", [1, 2, 8, 64])
def test_processor_entries(ncpus: int) -> None:
    _, _, entries = parse(ncpus)
    cpus = [e for e in entries if e[0] == 0]
    assert len(cpus) == ncpus
    for i, e in enumerate(cpus):
        _, apic_id, version, flags = struct.unpack_from("<BBBB", e)
        assert apic_id == i and version == 0x14
        assert flags & 1, "enabled"
        assert bool(flags & 2) == (i == 0), "BSP flag only on CPU 0"


@pytest.mark.parametrize("ncpus", [1, 3, 8])
def test_ioapic_and_isa_interrupts(ncpus: int) -> None:
    _, _, entries = parse(ncpus)
    buses = [e for e in entries if e[0] == 1]
    assert [(e[1], e[2:8]) for e in buses] == [(0, b"ISA   ")]
    ioapics = [e for e in entries if e[0] == 2]
    assert len(ioapics) == 1
    _, ioapic_id, _, flags, addr = struct.unpack("<BBBBI", ioapics[0])
    assert ioapic_id == ncpus + 1  # clear of every CPU's APIC ID
    assert (flags, addr) == (1, 0xFEC00000)
    routes = {}
    for e in (e for e in entries if e[0] == 3):
        _, kind, _, bus, irq, dst, pin = struct.unpack("<BBHBBBB", e)
        assert bus == 0 and dst == ioapic_id
        routes[irq] = (kind, pin)
    # ISA IRQ n on IOAPIC pin n, as KVM's default routing wires GSI n (the
    # in-kernel PIT raises GSI 0, so the timer is on pin 0).
    assert all(routes[i] == (0, i) for i in range(16))
    assert len({pin for _, pin in routes.values()}) == len(routes)
    lint = [struct.unpack("<BBHBBBB", e)[1:] for e in entries if e[0] == 4]
    assert (3, 0, 0, 0, 0, 0) in lint  # ExtINT -> LINT0 of the BSP
    assert (1, 0, 0, 0, 0xFF, 1) in lint  # NMI -> LINT1 of every CPU


def test_table_stays_inside_the_reserved_legacy_hole() -> None:
    for ncpus in (1, 64, 254):
        end = mptable.MPTABLE_ADDR + len(mptable.build(ncpus))
        assert end <= 0x100000
