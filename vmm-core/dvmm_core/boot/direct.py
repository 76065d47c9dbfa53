"""Direct kernel boot on a :class:`Machine`: load, lay out, set the vCPUs.

Owns the glue between :mod:`.linux` (pure layout) and a started machine:
writes the kernel, initrd, zero page and MP table into guest RAM and puts
the boot vCPU at the 64-bit entry point; every vCPU's LAPIC gets the PC's
LINT0/LINT1 wiring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..machine import mptable
from ..machine.pc import MachineError
from .linux import LinuxBootError, apply_cpu_state, prepare

if TYPE_CHECKING:
    from ..machine.pc import Machine


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise MachineError(f"cannot read {what} {path}: {exc.strerror}") from None


def prepare_linux(machine: Machine) -> None:
    cfg = machine.cfg
    assert cfg.kernel is not None
    kernel = _read(cfg.kernel, "kernel")
    initrd = _read(cfg.initrd, "initrd") if cfg.initrd else None
    try:
        boot = prepare(kernel, cfg.cmdline, machine.layout.e820(firmware=False),
                       machine.layout.low_size, initrd)
    except LinuxBootError as exc:
        raise MachineError(f"{cfg.kernel}: {exc}") from None
    for addr, data in boot.writes:
        machine.ram.mem.write(addr, data)
    machine.ram.mem.write(mptable.MPTABLE_ADDR, mptable.build(cfg.cpus))
    for vcpu in machine.vcpus:
        vcpu.setup_boot_lapic()
    apply_cpu_state(machine.vcpus[0], boot)
