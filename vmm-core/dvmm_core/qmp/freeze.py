"""Holding the VM's in-kernel timers still while QMP ``stop`` holds its vCPUs.

Stopped vCPUs execute nothing, but KVM's clocks run on: the in-kernel
i8254 keeps counting and queues the ticks it could not inject (its
reinjection policy replays them all on ``cont``), and kvmclock keeps
advancing.  As far as KVM allows, :class:`TimerFreeze` does what QEMU does
on a stop/cont pair (``hw/i386/kvm/i8254.c`` and ``kvm/clock.c``
vm-state-change handlers):

* ``KVM_GET_PIT2`` on stop, ``KVM_SET_PIT2`` on cont: the kernel reloads
  every channel's count from the saved state (``kvm_pit_load_count``) and
  clears the ticks pending for reinjection, so no burst of timer
  interrupts follows a long pause;
* ``KVM_GET_CLOCK`` on stop, ``KVM_SET_CLOCK`` on cont: kvmclock resumes
  where it stopped (a guest without kvmclock does not see it).

What KVM does not offer to freeze: the TSC and the LAPIC timer keep
running in the kernel (a guest reading the TSC sees the pause, as under
QEMU).  An ioctl the host refuses is skipped, once logged.

Structures: ``struct kvm_pit_state2`` and ``struct kvm_clock_data``
(arch/x86/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h).
"""

from __future__ import annotations

import ctypes
import logging

from ..kvm.ioctls import _IOR, _IOW, Ioctl, KvmError, kvm_ioctl

log = logging.getLogger("dvmm.qmp")

c_u8, c_u16, c_u32, c_u64, c_s64 = (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32,
                                    ctypes.c_uint64, ctypes.c_int64)


class KvmPitChannelState(ctypes.Structure):
    _fields_ = [("count", c_u32), ("latched_count", c_u16), ("count_latched", c_u8),
                ("status_latched", c_u8), ("status", c_u8), ("read_state", c_u8),
                ("write_state", c_u8), ("write_latch", c_u8), ("rw_mode", c_u8),
                ("mode", c_u8), ("bcd", c_u8), ("gate", c_u8), ("count_load_time", c_s64)]


class KvmPitState2(ctypes.Structure):
    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", c_u32),
                ("reserved", c_u32 * 9)]


class KvmClockData(ctypes.Structure):
    _fields_ = [("clock", c_u64), ("flags", c_u32), ("pad0", c_u32), ("realtime", c_u64),
                ("host_tsc", c_u64), ("pad", c_u32 * 4)]


assert ctypes.sizeof(KvmPitState2) == 112 and ctypes.sizeof(KvmClockData) == 48

KVM_GET_PIT2 = _IOR("KVM_GET_PIT2", 0x9F, KvmPitState2)
KVM_SET_PIT2 = _IOW("KVM_SET_PIT2", 0xA0, KvmPitState2)
KVM_GET_CLOCK = _IOR("KVM_GET_CLOCK", 0x7C, KvmClockData)
KVM_SET_CLOCK = _IOW("KVM_SET_CLOCK", 0x7B, KvmClockData)


class TimerFreeze:
    """Saved PIT and kvmclock state of one VM fd between stop and cont."""

    def __init__(self) -> None:
        self._pit: KvmPitState2 | None = None
        self._clock: KvmClockData | None = None
        self._fd = -1
        self._refused: set[str] = set()

    def save(self, vm_fd: int) -> None:
        self._fd = vm_fd
        pit, clock = KvmPitState2(), KvmClockData()
        self._pit = pit if self._try(vm_fd, KVM_GET_PIT2, pit) else None
        self._clock = clock if self._try(vm_fd, KVM_GET_CLOCK, clock) else None
        clock.flags = 0  # SET_CLOCK takes only the value (the realtime flags are GET's)

    def restore(self, vm_fd: int) -> None:
        """Put the saved state back, if it belongs to this VM fd (a reset
        while stopped made a new VM: its fresh timers are right as they are)."""
        pit, clock = self._pit, self._clock
        self._pit = self._clock = None
        if vm_fd != self._fd:
            return
        if pit is not None:
            self._try(vm_fd, KVM_SET_PIT2, pit)
        if clock is not None:
            self._try(vm_fd, KVM_SET_CLOCK, clock)

    def _try(self, fd: int, request: Ioctl, value: ctypes.Structure) -> bool:
        try:
            kvm_ioctl(fd, request, value)
            return True
        except KvmError as exc:
            name = request.name
            if name not in self._refused:
                self._refused.add(name)
                log.info("timers: %s refused (%s); that timer is not held still", name, exc)
            return False
