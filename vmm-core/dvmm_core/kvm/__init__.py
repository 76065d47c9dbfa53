"""The KVM layer of the dvmm core: ``/dev/kvm``, VMs, vCPUs and their threads.

``ioctls`` is the ABI (numbers, constants, ctypes structures); ``system``
opens ``/dev/kvm``; ``vm`` configures a VM; ``vcpu`` runs one vCPU and its
thread; ``cpuid`` normalises CPUID per vCPU; ``probe`` measures how fast
guest kernel code runs on this host.
"""

from .cpuid import CpuidEntry
from .ioctls import KvmError, KvmUnavailable
from .probe import ProbeResult, probe_host
from .system import Kvm, kvm_available
from .vcpu import IoBus, Vcpu, VcpuRunner, install_kick_handler
from .vm import IrqchipRoute, MsiRoute, Vm

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
