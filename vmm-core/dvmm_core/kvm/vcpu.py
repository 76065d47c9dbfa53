"""A KVM vCPU: its fd, its mmap'ed ``kvm_run`` page and its state.

``Vcpu`` owns one vCPU fd and the run page: register/MSR/LAPIC/CPUID state
and a single ``KVM_RUN``.  The thread that loops on ``KVM_RUN`` and serves
the exits is :mod:`.runner`'s ``VcpuRunner``.

The run page is offered two ways: typed (``kvm_run``, ctypes structures, for
everything that reads it rarely) and raw (``page`` and its 16/32/64-bit
casts, for the runner's per-exit decode: an index into a memoryview costs
~30 ns, a ctypes field of a nested structure ~100-300 ns).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .cpuid import CpuidEntry, normalize
from .ioctls import (
    KVM_CAP_TSC_DEADLINE_TIMER,
    KVM_EXIT_INTR,
    KVM_GET_CPUID2,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_NMI,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_FPU,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KvmError,
    KvmFpu,
    KvmLapicState,
    KvmMpState,
    KvmRegs,
    KvmRun,
    KvmRunExit,
    KvmRunMmio,
    KvmSregs,
    cpuid2_struct,
    ioctl_raw,
    kvm_ioctl,
    kvm_run_call,
    msrs_struct,
)

if TYPE_CHECKING:
    from .vm import Vm

# APIC registers (offsets in the APIC page) and LVT delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7
_APIC_DELIVERY_MODE = 0x700

FPU_DEFAULT_FCW = 0x37F
FPU_DEFAULT_MXCSR = 0x1F80

_MMIO_DATA = KvmRun.exit.offset + KvmRunExit.mmio.offset + KvmRunMmio.data.offset
_EXIT_REASON_WORD = KvmRun.exit_reason.offset // 4
_MAX_CPUID_ENTRIES = 4096
_RUN_SIZE = ctypes.sizeof(KvmRun)


class Vcpu:
    """One vCPU fd and its run page (created by ``Vm.create_vcpu``).

    Every vCPU ioctl takes the vCPU's mutex, which KVM_RUN holds for as long
    as the guest runs: reading or setting state from another thread blocks
    until the vCPU exits — forever for a halted vCPU with the in-kernel
    irqchip.  Stop the runner (``VcpuRunner.stop``) before touching state.
    """

    def __init__(self, vm: Vm, fd: int, index: int, mmap_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)
        self.kvm_run = KvmRun.from_buffer(self._map)
        # Raw views of the run page (offsets: ``struct kvm_run``, ioctls.KvmRun).
        self.page = self._view
        self.page16 = self._view.cast("H")
        self.page32 = self._view.cast("I")
        self.page64 = self._view.cast("Q")

    # --- running --------------------------------------------------------------

    def run(self) -> int:
        """One KVM_RUN; the exit reason.  A signal or ``immediate_exit`` gives
        KVM_EXIT_INTR; any other failure (EAGAIN: an AP still waiting for
        INIT/SIPI) raises ``KvmError`` with ``errno`` set."""
        if kvm_run_call(self.fd, KVM_RUN, 0) >= 0:
            return self.page32[_EXIT_REASON_WORD]
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return KVM_EXIT_INTR
        raise KvmError(f"KVM_RUN: {os.strerror(err)}", err)

    @property
    def exit_reason(self) -> int:
        return int(self.kvm_run.exit_reason)

    @property
    def exit(self) -> KvmRunExit:
        """The exit-data union of the last exit (``.io``, ``.mmio``, ``.system_event``,
        ``.internal``, ``.fail_entry``), a live view into the run page."""
        return self.kvm_run.exit  # type: ignore[no-any-return]

    @property
    def immediate_exit(self) -> bool:
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = int(value)

    def io_data(self) -> memoryview:
        """The ``size * count`` data bytes of the current KVM_EXIT_IO (write IN data here)."""
        io = self.kvm_run.exit.io
        start, length = io.data_offset, io.size * io.count
        if start < _RUN_SIZE or start + length > len(self._view):
            raise KvmError(f"KVM_RUN: I/O data {start:#x}+{length:#x} outside the run page",
                           errno.EFAULT)
        return self._view[start:start + length]

    def mmio_data(self) -> memoryview:
        """The 8-byte data field of the current KVM_EXIT_MMIO (fill it for reads)."""
        return self._view[_MMIO_DATA:_MMIO_DATA + 8]

    # --- register state -------------------------------------------------------

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        kvm_ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        kvm_ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        kvm_ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        kvm_ioctl(self.fd, KVM_SET_SREGS, sregs)

    def get_fpu(self) -> KvmFpu:
        fpu = KvmFpu()
        kvm_ioctl(self.fd, KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: KvmFpu | None = None) -> None:
        """Install ``fpu``; by default the boot state (FCW 0x37F, MXCSR 0x1F80)."""
        if fpu is None:
            fpu = KvmFpu(fcw=FPU_DEFAULT_FCW, mxcsr=FPU_DEFAULT_MXCSR)
        kvm_ioctl(self.fd, KVM_SET_FPU, fpu)

    def get_mp_state(self) -> int:
        state = KvmMpState()
        kvm_ioctl(self.fd, KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, state: int) -> None:
        kvm_ioctl(self.fd, KVM_SET_MP_STATE, KvmMpState(mp_state=state))

    def nmi(self) -> None:
        """Inject an NMI (in-kernel LAPIC required)."""
        kvm_ioctl(self.fd, KVM_NMI)

    # --- MSRs -----------------------------------------------------------------

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        """Write MSRs; raises naming the first one KVM refused."""
        items = list(msrs.items())
        buf = msrs_struct(len(items))()
        buf.nmsrs = len(items)
        for entry, (index, value) in zip(buf.entries, items, strict=True):
            entry.index, entry.data = index, value
        done = kvm_ioctl(self.fd, KVM_SET_MSRS, buf)
        if done != len(items):
            raise KvmError(f"KVM_SET_MSRS: MSR {items[done][0]:#x} was refused", errno.EINVAL)

    def get_msrs(self, idxs: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises naming the first one KVM refused."""
        idx = list(idxs)
        buf = msrs_struct(len(idx))()
        buf.nmsrs = len(idx)
        for entry, index in zip(buf.entries, idx, strict=True):
            entry.index = index
        done = kvm_ioctl(self.fd, KVM_GET_MSRS, buf)
        if done != len(idx):
            raise KvmError(f"KVM_GET_MSRS: MSR {idx[done]:#x} was refused", errno.EINVAL)
        return {int(e.index): int(e.data) for e in buf.entries}

    # --- CPUID ----------------------------------------------------------------

    def setup_cpuid(self, supported: list[CpuidEntry], ncpus: int) -> None:
        """Install ``supported`` normalised for this vCPU (see ``cpuid``)."""
        tsc_deadline = self.vm.has_irqchip and bool(
            self.vm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER))
        self.set_cpuid(normalize(supported, self.index, ncpus, tsc_deadline=tsc_deadline))

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        buf = cpuid2_struct(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e.to_struct()
        kvm_ioctl(self.fd, KVM_SET_CPUID2, buf)

    def get_cpuid(self) -> list[CpuidEntry]:
        """The table installed by ``set_cpuid`` (as KVM stored it)."""
        n = 64
        while True:
            buf = cpuid2_struct(n)()
            buf.nent = n
            ret, err = ioctl_raw(self.fd, KVM_GET_CPUID2, buf)
            if ret >= 0:
                return [CpuidEntry.from_struct(e) for e in buf.entries[:buf.nent]]
            if err != errno.E2BIG or n >= _MAX_CPUID_ENTRIES:
                raise KvmError(f"KVM_GET_CPUID2: {os.strerror(err)}", err)
            n *= 2

    # --- local APIC -----------------------------------------------------------

    def get_lapic(self) -> KvmLapicState:
        state = KvmLapicState()
        kvm_ioctl(self.fd, KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: KvmLapicState) -> None:
        kvm_ioctl(self.fd, KVM_SET_LAPIC, state)

    def setup_boot_lapic(self) -> None:
        """LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as a PC's BIOS leaves them
        (Firecracker ``interrupts.rs``, kvmtool ``x86/kvm-cpu.c``)."""
        state = self.get_lapic()
        for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
            state.set_reg(reg, (state.get_reg(reg) & ~_APIC_DELIVERY_MODE) | (mode << 8))
        self.set_lapic(state)

    # --- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Unmap the run page and close the fd.  The caller stops its runner first."""
        if self.fd < 0:
            return
        del self.kvm_run
        for view in (self.page16, self.page32, self.page64, self._view):
            view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view: GC unmaps
            self._map.close()
        os.close(self.fd)
        self.fd = -1
