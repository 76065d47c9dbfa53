"""The KVM layer of the dvmm core: ``/dev/kvm``, VMs, vCPUs and their threads.

``ioctls`` is the ABI (numbers, constants, ctypes structures); ``system``
opens ``/dev/kvm``; ``vm`` configures a VM; ``vcpu`` owns one vCPU and its
run page; ``runner`` is its thread and the exit path; ``cpuid`` normalises
CPUID per vCPU; ``probe`` measures how fast guest kernel code runs on this
host.
"""

from typing import TYPE_CHECKING, Any

from .cpuid import CpuidEntry
from .ioctls import KvmError, KvmUnavailable
from .runner import IoBus, VcpuRunner, install_kick_handler
from .system import Kvm, kvm_available
from .vcpu import Vcpu
from .vm import IrqchipRoute, MsiRoute, Vm

if TYPE_CHECKING:
    from .probe import ProbeResult, probe_host


def __getattr__(name: str) -> Any:
    """``probe`` runs a guest to time the host: imported only when asked for
    (``dvmm run --kernel``), not on every start-up."""
    if name in ("ProbeResult", "probe_host"):
        from . import probe

        return getattr(probe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CpuidEntry",
    "IoBus",
    "IrqchipRoute",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "MsiRoute",
    "ProbeResult",
    "Vcpu",
    "VcpuRunner",
    "Vm",
    "install_kick_handler",
    "kvm_available",
    "probe_host",
]
