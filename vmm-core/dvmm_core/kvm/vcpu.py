"""A KVM vCPU: its fd, its mmap'ed ``kvm_run`` page, its state — and the
thread that runs it.

``Vcpu`` owns one vCPU fd and the run page: register/MSR/LAPIC/CPUID state
and a single ``KVM_RUN``.  ``VcpuRunner`` owns the vCPU thread: it loops on
``KVM_RUN``, hands port and MMIO accesses to the machine's buses, and turns
everything that ends a run (shutdown, reset, crash, a KVM error) into one
``on_event(kind, detail)`` call before its thread ends.  What happens next
(restarting vCPUs after a reset, stopping the VM) is the machine's decision,
not this module's.

Stopping a vCPU that is inside ``KVM_RUN`` (notes §6): set
``kvm_run.immediate_exit`` — KVM checks it on entry, so a vCPU about to
enter returns at once — then ``pthread_kill(SIGUSR1)``, which forces a vCPU
already in guest mode (or blocked: HLT, an AP waiting for SIPI) out with
EINTR.  SIGUSR1 needs a handler (its default action kills the process; an
ignored signal never interrupts), installed once from the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from .cpuid import CpuidEntry, normalize
from .ioctls import (
    EXIT_REASON_NAMES,
    KVM_CAP_TSC_DEADLINE_TIMER,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_GET_CPUID2,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
    KVM_NMI,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_FPU,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
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
    msrs_struct,
)

if TYPE_CHECKING:
    from .vm import Vm

log = logging.getLogger("dvmm.vcpu")

# APIC registers (offsets in the APIC page) and LVT delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7
_APIC_DELIVERY_MODE = 0x700

FPU_DEFAULT_FCW = 0x37F
FPU_DEFAULT_MXCSR = 0x1F80

_MMIO_DATA = KvmRun.exit.offset + KvmRunExit.mmio.offset + KvmRunMmio.data.offset
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

    # --- running --------------------------------------------------------------

    def run(self) -> int:
        """One KVM_RUN; the exit reason.  A signal or ``immediate_exit`` gives
        KVM_EXIT_INTR; any other failure (EAGAIN: an AP still waiting for
        INIT/SIPI) raises ``KvmError`` with ``errno`` set."""
        ret, err = ioctl_raw(self.fd, KVM_RUN, 0)
        if ret >= 0:
            return int(self.kvm_run.exit_reason)
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
        self._view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view: GC unmaps
            self._map.close()
        os.close(self.fd)
        self.fd = -1


# --- the vCPU thread -------------------------------------------------------------

class IoBus(Protocol):
    """What the runner needs of a bus (``dvmm_core.machine.bus.Bus`` fits)."""

    def read(self, addr: int, size: int) -> int: ...
    def write(self, addr: int, size: int, value: int) -> None: ...


EventCallback = Callable[[str, str], None]
Event = tuple[str, str]

_SYSTEM_EVENTS = {KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", KVM_SYSTEM_EVENT_RESET: "reset",
                  KVM_SYSTEM_EVENT_CRASH: "crash"}
_INTERNAL_ERRORS = {
    KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit",
}
# Synchronous faults must stay deliverable; SIGUSR1 is the kick.
_VCPU_BLOCKED_SIGNALS = set(signal.valid_signals()) - {
    signal.SIGUSR1, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
    signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS}
_kick_lock = threading.Lock()
_kick_installed = False


def _kick(signum: int, frame: object) -> None:
    """SIGUSR1 exists only to interrupt KVM_RUN; nothing to do here."""


def install_kick_handler() -> None:
    """Install the no-op SIGUSR1 handler (once; from the main thread).

    ``VcpuRunner`` calls this itself when created on the main thread.  A
    program that creates runners elsewhere calls it at start-up.
    """
    global _kick_installed
    with _kick_lock:
        if _kick_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            current = signal.getsignal(signal.SIGUSR1)
            if current in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise RuntimeError("dvmm needs a SIGUSR1 handler to stop vCPUs: call "
                                   "dvmm_core.kvm.install_kick_handler() from the main thread")
            _kick_installed = True  # someone else's handler: it interrupts just as well
            return
        signal.signal(signal.SIGUSR1, _kick)
        _kick_installed = True


def _internal_data(suberror: int, words: list[int]) -> str:
    """The data of an internal-error exit, readable.  An emulation failure with
    the INSTRUCTION_BYTES flag carries {flags, insn_size, insn_bytes[15]} in
    data[0..2] (struct emulation_failure in linux/kvm.h)."""
    if (suberror == KVM_INTERNAL_ERROR_EMULATION and len(words) >= 3
            and words[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
        raw = b"".join(w.to_bytes(8, "little") for w in words[1:3])
        size = min(raw[0], 15)
        return f", instruction bytes {raw[1:1 + size].hex(' ')}" if size else ""
    return f", data {' '.join(hex(w) for w in words)}" if words else ""


class VcpuRunner:
    """The thread that runs one vCPU until an event or ``stop()``.

    Exits are served in the loop: port I/O (string I/O included) on ``pio``,
    MMIO on ``mmio``.  Shutdown, reset, crash and errors end the thread after
    one ``on_event(kind, detail)`` call made on the vCPU thread; ``kind`` is
    ``"shutdown"``, ``"reset"``, ``"crash"`` or ``"error"``.  A runner can be
    started again after it ended (the machine does that after a reset).

    ``on_event`` may stop its own runner, but should hand anything that stops
    *other* runners to another thread: two vCPU threads stopping each other
    from their callbacks would wait on each other forever.
    """

    def __init__(self, vcpu: Vcpu, pio: IoBus, mmio: IoBus, on_event: EventCallback) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.on_event = on_event
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Held while signalling; the thread takes it to mark itself gone, so
        # pthread_kill never targets a thread that has already exited.
        self._alive_lock = threading.Lock()
        self._alive = False
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
        self._handlers: dict[int, Callable[[], Event | None]] = {
            KVM_EXIT_IO: self._on_io, KVM_EXIT_MMIO: self._on_mmio,
            KVM_EXIT_INTR: lambda: None, KVM_EXIT_HLT: self._on_hlt,
            KVM_EXIT_SHUTDOWN: self._on_triple_fault, KVM_EXIT_SYSTEM_EVENT: self._on_system,
            KVM_EXIT_INTERNAL_ERROR: self._on_internal, KVM_EXIT_FAIL_ENTRY: self._on_fail_entry,
        }

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_current_thread(self) -> bool:
        """True when called on this runner's vCPU thread (e.g. from a device
        model serving one of its exits)."""
        return self._thread is not None and self._thread is threading.current_thread()

    @property
    def native_id(self) -> int | None:
        """The kernel thread ID of the vCPU thread (for /proc and psutil)."""
        return self._thread.native_id if self._thread is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"vCPU {self.vcpu.index} is already running")
        install_kick_handler()
        self._stopping = False
        self.vcpu.immediate_exit = False
        self._alive = True
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.vcpu.index}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Make the vCPU leave KVM_RUN and end its thread; wait for it unless
        called from the vCPU thread itself (e.g. from ``on_event``)."""
        self._stopping = True
        self.vcpu.immediate_exit = True
        thread = self._thread
        if thread is None or self.is_current_thread:
            return
        # Re-signal until it is gone: one signal could land while the thread is
        # between exits in Python, where it only interrupts a blocking syscall.
        waited = 0.0
        while thread.is_alive():
            with self._alive_lock:
                if self._alive and thread.ident is not None:
                    signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(0.02)
            waited += 0.02
            if waited >= timeout and thread.is_alive():
                raise RuntimeError(f"vCPU {self.vcpu.index} did not stop within {timeout} s")
        self.vcpu.immediate_exit = False

    # --- the loop -------------------------------------------------------------

    def _main(self) -> None:
        # Leave process-directed signals (SIGTERM, SIGINT, SIGCHLD...) to the
        # main thread: one delivered here would only interrupt KVM_RUN, and
        # Python would not wake a main thread blocked in a syscall.
        signal.pthread_sigmask(signal.SIG_BLOCK, _VCPU_BLOCKED_SIGNALS)
        try:
            event = self._loop()
        except Exception as exc:  # a device model bug must not vanish with the thread
            log.exception("vCPU %d: exit handling failed", self.vcpu.index)
            event = ("error", f"vCPU {self.vcpu.index}: {type(exc).__name__}: {exc}")
        finally:
            with self._alive_lock:
                self._alive = False
        if event is not None:
            try:
                self.on_event(*event)
            except Exception:
                log.exception("vCPU %d: on_event(%r) failed", self.vcpu.index, event)

    def _loop(self) -> Event | None:
        vcpu, handlers = self.vcpu, self._handlers
        while not self._stopping:
            try:
                reason = vcpu.run()
            except KvmError as exc:
                if exc.errno == errno.EAGAIN:
                    continue  # an AP woken before its SIPI: KVM blocks again inside
                return "error", f"vCPU {vcpu.index}: {exc} at {self._where()}"
            handler = handlers.get(reason)
            if handler is None:
                name = EXIT_REASON_NAMES.get(reason, "unknown")
                return "error", (f"vCPU {vcpu.index}: unhandled exit {reason} ({name}) "
                                 f"at {self._where()}")
            event = handler()
            if event is not None:
                return event
        return None

    # --- exits ----------------------------------------------------------------

    def _on_io(self) -> Event | None:
        io = self.vcpu.kvm_run.exit.io
        port, size, count = int(io.port), int(io.size), int(io.count)
        if size not in (1, 2, 4):
            return "error", f"vCPU {self.vcpu.index}: port I/O of {size} bytes at {port:#x}"
        data = self.vcpu.io_data()
        if io.direction == KVM_EXIT_IO_OUT:
            for off in range(0, size * count, size):
                self.pio.write(port, size, int.from_bytes(data[off:off + size], "little"))
        else:
            mask = (1 << (8 * size)) - 1
            for off in range(0, size * count, size):
                data[off:off + size] = (self.pio.read(port, size) & mask).to_bytes(size, "little")
        return None

    def _on_mmio(self) -> Event | None:
        mmio = self.vcpu.kvm_run.exit.mmio
        addr, size = int(mmio.phys_addr), int(mmio.len)
        if not 1 <= size <= 8:
            return "error", f"vCPU {self.vcpu.index}: MMIO of {size} bytes at {addr:#x}"
        data = self.vcpu.mmio_data()
        if mmio.is_write:
            self.mmio.write(addr, size, int.from_bytes(data[:size], "little"))
        else:
            value = self.mmio.read(addr, size) & ((1 << (8 * size)) - 1)
            data[:size] = value.to_bytes(size, "little")
        return None

    def _on_hlt(self) -> Event | None:
        if self.vcpu.vm.has_irqchip:
            return None  # not expected with an in-kernel LAPIC; just run again
        return "shutdown", (f"vCPU {self.vcpu.index} halted with no interrupt controller "
                            f"at {self._where()}")

    def _on_triple_fault(self) -> Event:
        return "reset", f"vCPU {self.vcpu.index}: triple fault at {self._where()}"

    def _on_system(self) -> Event:
        ev = self.vcpu.kvm_run.exit.system_event
        kind = _SYSTEM_EVENTS.get(int(ev.type))
        if kind is None:
            return "error", f"vCPU {self.vcpu.index}: unknown system event {ev.type}"
        return kind, f"vCPU {self.vcpu.index}: guest requested {kind}"

    def _on_internal(self) -> Event:
        internal = self.vcpu.kvm_run.exit.internal
        suberror = int(internal.suberror)
        words = [int(d) for d in internal.data[:min(int(internal.ndata), 16)]]
        what = _INTERNAL_ERRORS.get(suberror, "unknown")
        return "error", (f"vCPU {self.vcpu.index}: KVM internal error {suberror} ({what}) "
                         f"at {self._where()}{_internal_data(suberror, words)}")

    def _on_fail_entry(self) -> Event:
        fail = self.vcpu.kvm_run.exit.fail_entry
        return "error", (f"vCPU {self.vcpu.index}: VM entry failed, hardware reason "
                         f"{fail.hardware_entry_failure_reason:#x} on host CPU {fail.cpu} "
                         f"at {self._where()}")

    def _where(self) -> str:
        """Where the vCPU is, for a message: CS:RIP and the linear address."""
        try:
            rip = self.vcpu.get_regs().rip
            cs = self.vcpu.get_sregs().cs
        except KvmError as exc:
            return f"an unknown RIP ({exc})"
        return f"CS:RIP {cs.selector:04x}:{rip:#x} (linear {cs.base + rip:#x})"
