"""Per-vCPU CPUID: KVM's supported table, normalised for one vCPU.

Owns the CPUID entry type and the edits that make the host-derived table
describe *this* vCPU of *this* VM: its APIC ID, the logical-processor count
and the topology leaves.  It does not issue ioctls (``vcpu`` installs the
table) and does not hide features: the guest sees what KVM supports.

Why each edit (shared/notes/kvm-and-linux-boot.md §3; Firecracker
``cpu_config/x86_64/cpuid/normalize.rs``, kvmtool ``x86/cpuid.c``):

* leaf 1 EBX[31:24] is the initial APIC ID.  KVM reports the host CPU's;
  SeaBIOS and Linux use it to tell CPUs apart, so each vCPU gets its index.
* leaf 1 EBX[23:16] is the logical-processor count of the package and EDX
  bit 28 (HTT) says that count is valid: set for more than one vCPU.
* leaf 1 ECX bit 31 (hypervisor) stays set, ECX bit 24 (TSC deadline) is set
  when KVM can emulate it (KVM_GET_SUPPORTED_CPUID reports it clear).
* leaves 0xB and 0x1F (extended topology) carry the x2APIC ID in EDX of every
  subleaf; the topology is one socket of ``ncpus`` single-thread cores
  (subleaf 0 SMT, 1 core, 2 the invalid level that ends the enumeration).
* AMD leaf 0x8000001E EAX is the extended APIC ID, and 0x80000008 ECX holds
  the core count minus one and the APIC-ID bits used for cores.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from .ioctls import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KvmCpuidEntry2

LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28

# Extended topology (leaf 0xB / 0x1F) level types, in ECX[15:8].
_LEVEL_INVALID, _LEVEL_SMT, _LEVEL_CORE = 0, 1, 2


class CpuidEntry(NamedTuple):
    """One CPUID leaf/subleaf (``struct kvm_cpuid_entry2`` without padding); a
    NamedTuple, not a frozen dataclass: a quarter of the cost of creating the
    class at start-up."""

    function: int
    index: int  # type: ignore[assignment]  # shadows tuple.index, on purpose
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_struct(cls, e: Any) -> CpuidEntry:
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)

    def to_struct(self) -> KvmCpuidEntry2:
        return KvmCpuidEntry2(self.function, self.index, self.flags,
                              self.eax, self.ebx, self.ecx, self.edx)

    @property
    def significant_index(self) -> bool:
        return bool(self.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)


def _bits_for(n: int) -> int:
    """APIC-ID bits needed to number ``n`` items (ceil(log2(n)))."""
    return max(0, (n - 1).bit_length())


def _leaf1(e: CpuidEntry, apic_id: int, ncpus: int, tsc_deadline: bool) -> CpuidEntry:
    ebx = (e.ebx & 0x0000FFFF) | ((apic_id & 0xFF) << 24) | (min(ncpus, 0xFF) << 16)
    edx = e.edx | LEAF1_EDX_HTT if ncpus > 1 else e.edx & ~LEAF1_EDX_HTT
    ecx = e.ecx | LEAF1_ECX_HYPERVISOR
    if tsc_deadline:
        ecx |= LEAF1_ECX_TSC_DEADLINE
    return e._replace(ebx=ebx, ecx=ecx, edx=edx)


def _ext_topology(e: CpuidEntry, apic_id: int, ncpus: int) -> CpuidEntry:
    """Leaf 0xB/0x1F subleaf ``e.index``: SMT level (1 thread), core level, then invalid."""
    if e.index == 0:
        eax, ebx, level = 0, 1, _LEVEL_SMT
    elif e.index == 1:
        eax, ebx, level = _bits_for(ncpus), ncpus, _LEVEL_CORE
    else:
        eax, ebx, level = 0, 0, _LEVEL_INVALID
    return e._replace(eax=eax, ebx=ebx, ecx=(level << 8) | (e.index & 0xFF), edx=apic_id)


def _amd_size(e: CpuidEntry, ncpus: int) -> CpuidEntry:
    """Leaf 0x80000008 ECX: NC[7:0] = cores - 1, ApicIdSize[15:12]."""
    ecx = (e.ecx & ~0xF0FF) | ((ncpus - 1) & 0xFF) | (_bits_for(ncpus) << 12)
    return e._replace(ecx=ecx)


def _amd_ext_apic(e: CpuidEntry, apic_id: int) -> CpuidEntry:
    """Leaf 0x8000001E: EAX extended APIC ID, EBX core ID (1 thread/core), ECX node 0."""
    return e._replace(eax=apic_id, ebx=apic_id & 0xFF, ecx=0)


def normalize(supported: Iterable[CpuidEntry], apic_id: int, ncpus: int,
              *, tsc_deadline: bool = False) -> list[CpuidEntry]:
    """The CPUID table for the vCPU with ``apic_id`` in a VM of ``ncpus`` vCPUs."""
    if ncpus < 1 or not 0 <= apic_id < max(ncpus, 1):
        raise ValueError(f"APIC ID {apic_id} is not valid with {ncpus} vCPUs")
    out: list[CpuidEntry] = []
    for e in supported:
        if e.function in (0xB, 0x1F):
            # KVM lists only the subleaves the host has (just 0 on AMD here):
            # emit SMT, core and the terminating invalid level from subleaf 0.
            if e.index == 0:
                out.extend(_ext_topology(e._replace(index=i, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
                                         apic_id, ncpus) for i in range(3))
            continue
        if e.function == 1:
            e = _leaf1(e, apic_id, ncpus, tsc_deadline)
        elif e.function == 0x80000008:
            e = _amd_size(e, ncpus)
        elif e.function == 0x8000001E:
            e = _amd_ext_apic(e, apic_id)
        out.append(e)
    return out


def find(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for ``function``/``index`` (index ignored unless significant)."""
    for e in entries:
        if e.function == function and (e.index == index or not e.significant_index):
            return e
    return None
