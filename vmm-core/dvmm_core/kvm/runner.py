"""The vCPU thread: ``KVM_RUN`` in a loop, and what each exit means.

``VcpuRunner`` owns one vCPU's thread: it loops on ``KVM_RUN``, hands port
and MMIO accesses to the machine's buses, and turns everything that ends a
run (shutdown, reset, crash, a KVM error) into one ``on_event(kind,
detail)`` call before its thread ends.  What happens next (restarting vCPUs
after a reset, stopping the VM) is the machine's decision, not this module's.

The exit path is the core's one per-instruction cost in Python, so it is
written for as few interpreter operations as possible (issue 9, "Exit
path"; ``dvmm bench core`` measures it against QEMU):

* ``KVM_RUN`` goes through ``ioctls.kvm_run_call`` (libc ``ioctl`` without
  ctypes argument converters);
* the exit is decoded from raw memoryview words of the run page
  (``Vcpu.page*``), not through ctypes structures;
* the most frequent exit -- one byte through one port (POST-code delays,
  the UART, fw_cfg data, CMOS) -- is served inline in the loop with
  everything it touches bound to locals; other port and MMIO exits take
  one method call, the rare kinds a dict lookup;
* the bus (``machine.bus``) finds the device through a per-address cache.

Stopping a vCPU that is inside ``KVM_RUN`` (notes §6): set
``kvm_run.immediate_exit`` — KVM checks it on entry, so a vCPU about to
enter returns at once — then ``pthread_kill(SIGUSR1)``, which forces a vCPU
already in guest mode (or blocked: HLT, an AP waiting for SIPI) out with
EINTR.  SIGUSR1 needs a handler (its default action kills the process; an
ignored signal never interrupts), installed once from the main thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import struct
import threading
from collections.abc import Callable
from typing import Protocol

from .ioctls import (
    EXIT_REASON_NAMES,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
    KVM_RUN,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    KvmError,
    KvmRun,
    KvmRunExit,
    KvmRunIo,
    KvmRunMmio,
    kvm_run_call,
)
from .vcpu import Vcpu

log = logging.getLogger("dvmm.vcpu")


class IoBus(Protocol):
    """What the runner needs of a bus (``dvmm_core.machine.bus.Bus`` fits)."""

    def read(self, addr: int, size: int) -> int: ...
    def write(self, addr: int, size: int, value: int) -> None: ...


EventCallback = Callable[[str, str], None]
Event = tuple[str, str]

# Where the exit's fields are in the run page, as indexes into Vcpu.page
# (bytes), page16, page32 and page64 (struct kvm_run, linux/kvm.h).
_RUN_SIZE = ctypes.sizeof(KvmRun)
_REASON32 = KvmRun.exit_reason.offset // 4
_IO = KvmRun.exit.offset + KvmRunExit.io.offset
_IO_DIRECTION = _IO + KvmRunIo.direction.offset
_IO_SIZE = _IO + KvmRunIo.size.offset
_IO_PORT16 = (_IO + KvmRunIo.port.offset) // 2
_IO_COUNT32 = (_IO + KvmRunIo.count.offset) // 4
_IO_DATA64 = (_IO + KvmRunIo.data_offset.offset) // 8
_MMIO = KvmRun.exit.offset + KvmRunExit.mmio.offset
_MMIO_ADDR64 = (_MMIO + KvmRunMmio.phys_addr.offset) // 8
_MMIO_DATA = _MMIO + KvmRunMmio.data.offset
_MMIO_LEN32 = (_MMIO + KvmRunMmio.len.offset) // 4
_MMIO_IS_WRITE = _MMIO + KvmRunMmio.is_write.offset
assert (_REASON32, _IO_DIRECTION, _IO_SIZE, _IO_PORT16, _IO_COUNT32, _IO_DATA64) == (
    2, 32, 33, 17, 9, 5), "struct kvm_run layout"
assert (_MMIO_ADDR64, _MMIO_DATA, _MMIO_LEN32, _MMIO_IS_WRITE) == (4, 40, 12, 52)
#: exit_reason and the io exit in one call: reason, direction, size, port, count,
#: data_offset (one unpack costs about half of six memoryview subscripts).
_EXIT_HEADER = struct.Struct("<8xI20xBBHIQ")
assert _EXIT_HEADER.size == _IO_DATA64 * 8 + 8
_KVM_RUN = int(KVM_RUN)

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
        # The rare exits (port I/O and MMIO are decoded before this lookup).
        self._handlers: dict[int, Callable[[], Event | None]] = {
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
        """KVM_RUN until an event or ``stop()``.  Everything the loop touches
        per exit is a local; one byte through one port is served right here
        (see the module doc).  Indexes: the ``_IO*``/``_REASON32`` constants."""
        vcpu = self.vcpu
        run, fd, nr, errno_now = kvm_run_call, vcpu.fd, _KVM_RUN, ctypes.get_errno
        page, header = vcpu.page, _EXIT_HEADER.unpack_from
        pio_read, pio_write, on_exit = self.pio.read, self.pio.write, self._on_exit
        low, high = _RUN_SIZE, len(page)  # where KVM may put port data (checked: hostile)
        while not self._stopping:
            if run(fd, nr, 0) < 0:
                event = self._run_failed(errno_now())
            else:
                reason, out, size, port, count, at = header(page)
                if reason == 2 and count == 1 and size == 1 and low <= at < high:  # KVM_EXIT_IO
                    if out:
                        pio_write(port, 1, page[at])
                    else:
                        page[at] = pio_read(port, 1) & 0xFF
                    continue
                event = on_exit(reason)
            if event is not None:
                return event
        return None

    def _run_failed(self, err: int) -> Event | None:
        if err == errno.EINTR:
            return None  # a signal or immediate_exit: the loop looks at _stopping
        if err == errno.EAGAIN:
            return None  # an AP woken before its SIPI: KVM blocks again inside
        return "error", f"vCPU {self.vcpu.index}: KVM_RUN: {os.strerror(err)} at {self._where()}"

    def _on_exit(self, reason: int) -> Event | None:
        if reason == KVM_EXIT_IO:
            return self._on_io()
        if reason == KVM_EXIT_MMIO:
            return self._on_mmio()
        handler = self._handlers.get(reason)
        if handler is None:
            name = EXIT_REASON_NAMES.get(reason, "unknown")
            return "error", (f"vCPU {self.vcpu.index}: unhandled exit {reason} ({name}) "
                             f"at {self._where()}")
        return handler()

    # --- exits ----------------------------------------------------------------

    def _on_io(self) -> Event | None:
        page = self.vcpu.page
        port, size = self.vcpu.page16[_IO_PORT16], page[_IO_SIZE]
        count, start = self.vcpu.page32[_IO_COUNT32], self.vcpu.page64[_IO_DATA64]
        if size not in (1, 2, 4):
            return "error", f"vCPU {self.vcpu.index}: port I/O of {size} bytes at {port:#x}"
        end = start + size * count
        if start < _RUN_SIZE or end > len(page):
            return "error", (f"vCPU {self.vcpu.index}: KVM_RUN: I/O data {start:#x}+"
                             f"{size * count:#x} outside the run page")
        if page[_IO_DIRECTION] == KVM_EXIT_IO_OUT:
            write = self.pio.write
            for off in range(start, end, size):
                write(port, size, int.from_bytes(page[off:off + size], "little"))
        else:
            read, mask = self.pio.read, (1 << (8 * size)) - 1
            for off in range(start, end, size):
                page[off:off + size] = (read(port, size) & mask).to_bytes(size, "little")
        return None

    def _on_mmio(self) -> Event | None:
        vcpu = self.vcpu
        addr, size = vcpu.page64[_MMIO_ADDR64], vcpu.page32[_MMIO_LEN32]
        if not 1 <= size <= 8:
            return "error", f"vCPU {vcpu.index}: MMIO of {size} bytes at {addr:#x}"
        data = vcpu.page[_MMIO_DATA:_MMIO_DATA + size]
        if vcpu.page[_MMIO_IS_WRITE]:
            self.mmio.write(addr, size, int.from_bytes(data, "little"))
        else:
            value = self.mmio.read(addr, size) & ((1 << (8 * size)) - 1)
            data[:] = value.to_bytes(size, "little")
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
