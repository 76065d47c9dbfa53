"""Host probe: how fast does guest kernel-mode code run under this KVM?

Owns the calibration guest and the verdict the hwkvm test tier and the CLI
print.  On hosts where ``/dev/kvm`` is the kvm_pvm module, guest code at CPL0
(firmware, any kernel) runs in a software emulator at about 1.6 M
instructions/s: SeaBIOS works, a Linux kernel does not (DESIGN.md).  The
probe measures instead of guessing from module names: a real-mode guest
counts ECX down (``dec ecx; jnz``: 2 instructions per turn) and then does
one OUT; the host times KVM_RUN for a large and a trivial count and takes
the difference, growing the count until the loop lasts a few milliseconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dvmm_shared.memory import memfd_region

from .ioctls import KVM_EXIT_INTR, KVM_EXIT_IO, KvmError, KvmUnavailable
from .system import Kvm
from .vcpu import Vcpu

HARDWARE_MIPS = 50.0  # below this a Linux boot is hopeless (hardware does thousands)
KVM_PVM_SYSFS = "/sys/module/kvm_pvm"

_RAM_SIZE = 0x10000
_CODE_ADDR = 0x1000
_DONE_PORT = 0x80
# 16-bit real mode at 0000:1000:
#   1000: 66 49   dec ecx
#   1002: 75 fc   jnz 1000
#   1004: e6 80   out 0x80, al
#   1006: f4      hlt
_CODE = bytes([0x66, 0x49, 0x75, 0xFC, 0xE6, _DONE_PORT, 0xF4])
_INSNS_PER_TURN = 2
_FIRST_TURNS = 20_000
_MAX_TURNS = 0x7FFFFFFF
_TARGET_S = 0.02   # a loop this long dwarfs the KVM_RUN round trip
_MIN_S = 0.005


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured; ``reason`` is one sentence for logs and skips."""

    kernel_mode_mips: float
    hardware_speed: bool
    kvm_pvm: bool
    reason: str


def kvm_pvm_loaded() -> bool:
    return os.path.isdir(KVM_PVM_SYSFS)


def probe_host(kvm: Kvm | None = None) -> ProbeResult:
    """Measure guest kernel-mode speed (about 0.1 s on kvm_pvm, less on hardware).

    Never raises for an unusable KVM: the result says why instead.
    """
    pvm = kvm_pvm_loaded()
    try:
        mips = _measure(kvm) if kvm is not None else _measure_own()
    except KvmError as exc:
        what = "KVM is unavailable" if isinstance(exc, KvmUnavailable) else "the probe failed"
        return ProbeResult(0.0, False, pvm, f"{what} ({exc}): Linux guests cannot boot here")
    fast = mips >= HARDWARE_MIPS
    return ProbeResult(mips, fast, pvm, _verdict(mips, fast, pvm))


def _verdict(mips: float, fast: bool, pvm: bool) -> str:
    rate = f"guest kernel-mode code runs at {mips:,.1f} M instructions/s"
    if fast:
        return f"{rate} (hardware speed): Linux guests can boot on this host"
    why = "kvm_pvm software emulation" if pvm else f"below {HARDWARE_MIPS:.0f} M/s"
    return f"{rate} ({why}): Linux guests cannot boot on this host"


def _measure_own() -> float:
    with Kvm() as kvm:
        return _measure(kvm)


def _measure(kvm: Kvm) -> float:
    mem_fd, region = memfd_region(_RAM_SIZE, name="dvmm-probe")
    vm = kvm.create_vm()
    try:
        region.view[_CODE_ADDR:_CODE_ADDR + len(_CODE)] = _CODE
        vm.set_user_memory_region(0, 0, _RAM_SIZE, region.user_addr)
        vcpu = vm.create_vcpu(0)
        _real_mode_cs0(vcpu)
        return _calibrate(vcpu)
    finally:
        vm.close()
        os.close(mem_fd)


def _real_mode_cs0(vcpu: Vcpu) -> None:
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)


def _calibrate(vcpu: Vcpu) -> float:
    _timed_loop(vcpu, 1)  # first entry pays for faulting in the page
    overhead = min(_timed_loop(vcpu, 1) for _ in range(3))
    turns = _FIRST_TURNS
    while True:
        elapsed = _timed_loop(vcpu, turns) - overhead
        if elapsed >= _MIN_S or turns >= _MAX_TURNS:
            return turns * _INSNS_PER_TURN / max(elapsed, 1e-9) / 1e6
        grow = _TARGET_S / max(elapsed, _TARGET_S / 10_000)
        turns = min(_MAX_TURNS, int(turns * grow))


def _timed_loop(vcpu: Vcpu, turns: int) -> float:
    """Seconds for one KVM_RUN of ``turns`` loop turns up to the OUT exit."""
    for _ in range(3):  # a stray signal (KVM_EXIT_INTR) spoils a sample: take another
        regs = vcpu.get_regs()
        regs.rip, regs.rcx, regs.rflags = _CODE_ADDR, turns, 0x2
        vcpu.set_regs(regs)
        start = time.perf_counter()
        reason = vcpu.run()
        elapsed = time.perf_counter() - start
        if reason != KVM_EXIT_INTR:
            break
    if reason != KVM_EXIT_IO or vcpu.exit.io.port != _DONE_PORT:
        raise KvmError(f"calibration guest stopped with exit reason {reason}, not its OUT")
    return elapsed
