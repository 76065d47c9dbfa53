"""The KVM ABI: ioctl numbers, constants and typed ctypes structures.

Owns the binary layout of everything dvmm exchanges with ``/dev/kvm`` and the
one function that issues an ioctl.  It knows nothing about VMs or vCPUs as
objects (``system``, ``vm`` and ``vcpu`` do); no other module spells an
offset or an ioctl number.

Numbers follow ``include/uapi/asm-generic/ioctl.h``:
``dir << 30 | size << 16 | type << 8 | nr`` with KVM's type 0xAE, and the
size taken from the structure itself, so a layout mistake also shows up as a
wrong number (the tests pin both against shared/notes/kvm-and-linux-boot.md
§1, which were checked against the C headers).

Every ioctl goes through libc's ``ioctl`` via ctypes rather than
``fcntl.ioctl``: KVM_RUN must return EINTR instead of being retried (CPython
3.14 ``fcntl.ioctl`` retries, gh-132742), and value arguments such as a TSS
address above 2 GiB overflow the C ``int`` that ``fcntl.ioctl`` parses.
ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

c_u8 = ctypes.c_uint8
c_u16 = ctypes.c_uint16
c_u32 = ctypes.c_uint32
c_u64 = ctypes.c_uint64


class KvmError(Exception):
    """A failed KVM ioctl; the message names the ioctl and the error."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class KvmUnavailable(KvmError):
    """``/dev/kvm`` is missing, not accessible, or speaks another API version."""


# --- the ioctl encoding ------------------------------------------------------

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


class Ioctl(int):
    """An ioctl number that remembers its name (for error messages)."""

    name: str

    def __new__(cls, name: str, number: int) -> Ioctl:
        obj = super().__new__(cls, number)
        obj.name = name
        return obj

    def __repr__(self) -> str:
        return f"{self.name}({int(self):#x})"


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(name: str, nr: int) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_NONE, nr, 0))


def _IOR(name: str, nr: int, ctype: Any) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_READ, nr, ctypes.sizeof(ctype)))


def _IOW(name: str, nr: int, ctype: Any) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_WRITE, nr, ctypes.sizeof(ctype)))


def _IOWR(name: str, nr: int, ctype: Any) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(ctype)))


# --- structures (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) --

class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", c_u32), ("flags", c_u32), ("guest_phys_addr", c_u64),
                ("memory_size", c_u64), ("userspace_addr", c_u64)]


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", c_u64), ("limit", c_u32), ("selector", c_u16),
                ("type", c_u8), ("present", c_u8), ("dpl", c_u8), ("db", c_u8),
                ("s", c_u8), ("l", c_u8), ("g", c_u8), ("avl", c_u8),
                ("unusable", c_u8), ("padding", c_u8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [*((n, KvmSegment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
                ("gdt", KvmDtable), ("idt", KvmDtable),
                *((n, c_u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
                ("interrupt_bitmap", c_u64 * 4)]


class KvmFpu(ctypes.Structure):
    _fields_ = [("fpr", (c_u8 * 16) * 8), ("fcw", c_u16), ("fsw", c_u16), ("ftwx", c_u8),
                ("pad1", c_u8), ("last_opcode", c_u16), ("last_ip", c_u64),
                ("last_dp", c_u64), ("xmm", (c_u8 * 16) * 16), ("mxcsr", c_u32),
                ("pad2", c_u32)]


KVM_APIC_REG_SIZE = 0x400


class KvmLapicState(ctypes.Structure):
    """The 1 KiB APIC register page (register at offset ``reg``, 16-byte stride)."""

    _fields_ = [("regs", c_u8 * KVM_APIC_REG_SIZE)]

    def get_reg(self, reg: int) -> int:
        return int.from_bytes(bytes(self.regs[reg:reg + 4]), "little")

    def set_reg(self, reg: int, value: int) -> None:
        self.regs[reg:reg + 4] = list(value.to_bytes(4, "little"))


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", c_u32), ("index", c_u32), ("flags", c_u32), ("eax", c_u32),
                ("ebx", c_u32), ("ecx", c_u32), ("edx", c_u32), ("padding", c_u32 * 3)]


class KvmCpuid2(ctypes.Structure):
    """Header only; ``cpuid2_struct(n)`` gives the type with ``n`` entries."""

    _fields_ = [("nent", c_u32), ("padding", c_u32)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", c_u32), ("reserved", c_u32), ("data", c_u64)]


class KvmMsrs(ctypes.Structure):
    """Header only; ``msrs_struct(n)`` gives the type with ``n`` entries."""

    _fields_ = [("nmsrs", c_u32), ("pad", c_u32)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", c_u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", c_u32), ("pad", c_u32 * 15)]


class KvmIrqLevel(ctypes.Structure):
    # ``irq`` shares its word with ``status`` (KVM_IRQ_LINE_STATUS output).
    _fields_ = [("irq", c_u32), ("level", c_u32)]


class KvmIrqRoutingIrqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_u32), ("pin", c_u32)]


class KvmIrqRoutingMsi(ctypes.Structure):
    _fields_ = [("address_lo", c_u32), ("address_hi", c_u32), ("data", c_u32),
                ("devid", c_u32)]


class _KvmIrqRoutingUnion(ctypes.Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi),
                ("pad", c_u32 * 8)]


class KvmIrqRoutingEntry(ctypes.Structure):
    _fields_ = [("gsi", c_u32), ("type", c_u32), ("flags", c_u32), ("pad", c_u32),
                ("u", _KvmIrqRoutingUnion)]


class KvmIrqRouting(ctypes.Structure):
    """Header only; ``irq_routing_struct(n)`` gives the type with ``n`` entries."""

    _fields_ = [("nr", c_u32), ("flags", c_u32)]


class KvmIrqfd(ctypes.Structure):
    _fields_ = [("fd", c_u32), ("gsi", c_u32), ("flags", c_u32), ("resamplefd", c_u32),
                ("pad", c_u8 * 16)]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [("datamatch", c_u64), ("addr", c_u64), ("len", c_u32), ("fd", ctypes.c_int32),
                ("flags", c_u32), ("pad", c_u8 * 36)]


class KvmMsi(ctypes.Structure):
    _fields_ = [("address_lo", c_u32), ("address_hi", c_u32), ("data", c_u32),
                ("flags", c_u32), ("devid", c_u32), ("pad", c_u8 * 12)]


# --- struct kvm_run (the mmap'ed vCPU communication page) --------------------

class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", c_u8), ("size", c_u8), ("port", c_u16), ("count", c_u32),
                ("data_offset", c_u64)]


class KvmRunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_u64), ("data", c_u8 * 8), ("len", c_u32), ("is_write", c_u8)]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = [("type", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_u64), ("cpu", c_u32)]


class KvmRunHw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_u64)]


class KvmRunException(ctypes.Structure):
    _fields_ = [("exception", c_u32), ("error_code", c_u32)]


class KvmRunExit(ctypes.Union):
    _fields_ = [("hw", KvmRunHw), ("fail_entry", KvmRunFailEntry), ("ex", KvmRunException),
                ("io", KvmRunIo), ("mmio", KvmRunMmio), ("internal", KvmRunInternal),
                ("system_event", KvmRunSystemEvent), ("padding", c_u8 * 256)]


class KvmRun(ctypes.Structure):
    _fields_ = [("request_interrupt_window", c_u8), ("immediate_exit", c_u8),
                ("padding1", c_u8 * 6), ("exit_reason", c_u32),
                ("ready_for_interrupt_injection", c_u8), ("if_flag", c_u8), ("flags", c_u16),
                ("cr8", c_u64), ("apic_base", c_u64), ("exit", KvmRunExit),
                ("kvm_valid_regs", c_u64), ("kvm_dirty_regs", c_u64),
                ("sync_regs", c_u8 * 2048)]


_SIZES = {KvmUserspaceMemoryRegion: 32, KvmRegs: 144, KvmSegment: 24, KvmDtable: 16,
          KvmSregs: 312, KvmFpu: 416, KvmLapicState: 1024, KvmCpuidEntry2: 40, KvmCpuid2: 8,
          KvmMsrEntry: 16, KvmMsrs: 8, KvmPitConfig: 64, KvmIrqLevel: 8,
          KvmIrqRoutingEntry: 48, KvmIrqRouting: 8, KvmIrqfd: 32, KvmIoeventfd: 64,
          KvmMsi: 32, KvmRun: 2352}
for _t, _n in _SIZES.items():
    assert ctypes.sizeof(_t) == _n, f"{_t.__name__} is {ctypes.sizeof(_t)} bytes, not {_n}"
assert KvmRun.exit.offset == 32 and KvmSregs.cr0.offset == 224 and KvmFpu.mxcsr.offset == 408


def _flex(header: Any, entry: Any, name: str, n: int) -> Any:
    return type(f"{header.__name__}_{n}", (ctypes.Structure,),
                {"_fields_": [*header._fields_, (name, entry * n)]})


def cpuid2_struct(n: int) -> Any:
    """``struct kvm_cpuid2`` with room for ``n`` entries."""
    return _flex(KvmCpuid2, KvmCpuidEntry2, "entries", n)


def msrs_struct(n: int) -> Any:
    """``struct kvm_msrs`` with room for ``n`` entries."""
    return _flex(KvmMsrs, KvmMsrEntry, "entries", n)


def irq_routing_struct(n: int) -> Any:
    """``struct kvm_irq_routing`` with room for ``n`` entries."""
    return _flex(KvmIrqRouting, KvmIrqRoutingEntry, "entries", n)


# --- ioctl numbers ------------------------------------------------------------

# system fd
KVM_GET_API_VERSION = _IO("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _IO("KVM_CREATE_VM", 0x01)
KVM_CHECK_EXTENSION = _IO("KVM_CHECK_EXTENSION", 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO("KVM_GET_VCPU_MMAP_SIZE", 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR("KVM_GET_SUPPORTED_CPUID", 0x05, KvmCpuid2)
# VM fd
KVM_CREATE_VCPU = _IO("KVM_CREATE_VCPU", 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW("KVM_SET_USER_MEMORY_REGION", 0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO("KVM_SET_TSS_ADDR", 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW("KVM_SET_IDENTITY_MAP_ADDR", 0x48, c_u64)
KVM_CREATE_IRQCHIP = _IO("KVM_CREATE_IRQCHIP", 0x60)
KVM_IRQ_LINE = _IOW("KVM_IRQ_LINE", 0x61, KvmIrqLevel)
KVM_IRQ_LINE_STATUS = _IOWR("KVM_IRQ_LINE_STATUS", 0x67, KvmIrqLevel)
KVM_SET_GSI_ROUTING = _IOW("KVM_SET_GSI_ROUTING", 0x6A, KvmIrqRouting)
KVM_IRQFD = _IOW("KVM_IRQFD", 0x76, KvmIrqfd)
KVM_CREATE_PIT2 = _IOW("KVM_CREATE_PIT2", 0x77, KvmPitConfig)
KVM_IOEVENTFD = _IOW("KVM_IOEVENTFD", 0x79, KvmIoeventfd)
KVM_SIGNAL_MSI = _IOW("KVM_SIGNAL_MSI", 0xA5, KvmMsi)
# vCPU fd
KVM_RUN = _IO("KVM_RUN", 0x80)
KVM_GET_REGS = _IOR("KVM_GET_REGS", 0x81, KvmRegs)
KVM_SET_REGS = _IOW("KVM_SET_REGS", 0x82, KvmRegs)
KVM_GET_SREGS = _IOR("KVM_GET_SREGS", 0x83, KvmSregs)
KVM_SET_SREGS = _IOW("KVM_SET_SREGS", 0x84, KvmSregs)
KVM_GET_MSRS = _IOWR("KVM_GET_MSRS", 0x88, KvmMsrs)
KVM_SET_MSRS = _IOW("KVM_SET_MSRS", 0x89, KvmMsrs)
KVM_GET_FPU = _IOR("KVM_GET_FPU", 0x8C, KvmFpu)
KVM_SET_FPU = _IOW("KVM_SET_FPU", 0x8D, KvmFpu)
KVM_GET_LAPIC = _IOR("KVM_GET_LAPIC", 0x8E, KvmLapicState)
KVM_SET_LAPIC = _IOW("KVM_SET_LAPIC", 0x8F, KvmLapicState)
KVM_SET_CPUID2 = _IOW("KVM_SET_CPUID2", 0x90, KvmCpuid2)
KVM_GET_CPUID2 = _IOWR("KVM_GET_CPUID2", 0x91, KvmCpuid2)
KVM_GET_MP_STATE = _IOR("KVM_GET_MP_STATE", 0x98, KvmMpState)
KVM_SET_MP_STATE = _IOW("KVM_SET_MP_STATE", 0x99, KvmMpState)
KVM_NMI = _IO("KVM_NMI", 0x9A)

KVM_API_VERSION = 12

# --- capabilities (KVM_CHECK_EXTENSION) ---------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_USER_NMI = 22
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_IMMEDIATE_EXIT = 136

# --- flags and enumerations ---------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic: the kernel's spelling)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

EXIT_REASON_NAMES = {v: k for k, v in globals().items()
                     if k.startswith("KVM_EXIT_") and not k.startswith("KVM_EXIT_IO_")}


# --- issuing an ioctl ---------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

#: ``kvm_run_call(vcpu_fd, KVM_RUN, 0)``: the vCPU loop's ioctl, issued once per
#: exit.  The same libc ``ioctl`` as above but a separate function object
#: without ``argtypes``: ctypes then passes the Python ints as C ints directly,
#: which saves about a microsecond per call (measured; the argtypes converters
#: are Python-level work).  Only for KVM_RUN: its request fits an int and its
#: argument is unused.  ``use_errno`` keeps EINTR/EAGAIN readable with
#: ``ctypes.get_errno()``.
kvm_run_call = ctypes.CDLL(None, use_errno=True).ioctl
kvm_run_call.restype = ctypes.c_int


def ioctl_raw(fd: int, request: Ioctl, arg: Any = 0) -> tuple[int, int]:
    """Issue one ioctl; return ``(result, errno)`` without raising.

    ``arg`` is an integer value or a ctypes object (passed by reference).
    """
    ptr = arg if isinstance(arg, int) else ctypes.byref(arg)
    ret: int = _libc_ioctl(fd, request, ptr)
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def kvm_ioctl(fd: int, request: Ioctl, arg: Any = 0) -> int:
    """Issue one ioctl and return its result; raise ``KvmError`` on failure.

    EINTR (a signal arrived before the call did anything) is retried, which
    is right for every KVM ioctl except KVM_RUN (see ``Vcpu.run``).
    """
    while True:
        ret, err = ioctl_raw(fd, request, arg)
        if ret >= 0:
            return ret
        if err != errno.EINTR:
            raise KvmError(f"{request.name}: {os.strerror(err)}", err)
