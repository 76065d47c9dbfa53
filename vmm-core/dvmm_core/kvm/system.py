"""The KVM system handle: ``/dev/kvm`` itself.

Owns the ``/dev/kvm`` fd and the questions asked of it (API version,
capabilities, supported CPUID, the vCPU mmap size) and creates VMs.  VM and
vCPU state live in ``vm`` and ``vcpu``.
"""

from __future__ import annotations

import errno
import os

from .cpuid import CpuidEntry
from .ioctls import (
    KVM_API_VERSION,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE,
    KvmError,
    KvmUnavailable,
    cpuid2_struct,
    ioctl_raw,
    kvm_ioctl,
)
from .vm import Vm

# KVM caps the table at KVM_MAX_CPUID_ENTRIES (256); start where this host
# needs (75 entries) and grow on E2BIG.
_CPUID_FIRST_GUESS = 128
_CPUID_LIMIT = 4096

_OPEN_HINTS = {
    errno.ENOENT: "is the kvm module loaded?",
    errno.EACCES: "add this user to the 'kvm' group or pass --device /dev/kvm",
    errno.EPERM: "add this user to the 'kvm' group or pass --device /dev/kvm",
    errno.ENXIO: "the kvm module is loaded but virtualization is disabled",
}


def _open_kvm(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        hint = _OPEN_HINTS.get(exc.errno or 0)
        tail = f" ({hint})" if hint else ""
        raise KvmUnavailable(f"cannot open {path}: {exc.strerror}{tail}", exc.errno or 0) from None


class Kvm:
    """An open ``/dev/kvm`` with the API version checked."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self.fd = _open_kvm(path)
        try:
            self.api_version = kvm_ioctl(self.fd, KVM_GET_API_VERSION)
            if self.api_version != KVM_API_VERSION:
                raise KvmUnavailable(f"{path} speaks KVM API version {self.api_version}, "
                                     f"dvmm needs {KVM_API_VERSION}")
            self.vcpu_mmap_size = kvm_ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when absent, else a capability-specific value."""
        return kvm_ioctl(self._checked_fd(), KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """The CPUID leaves KVM can present to a guest on this host."""
        n = _CPUID_FIRST_GUESS
        while True:
            buf = cpuid2_struct(n)()
            buf.nent = n
            ret, err = ioctl_raw(self._checked_fd(), KVM_GET_SUPPORTED_CPUID, buf)
            if ret >= 0:
                return [CpuidEntry.from_struct(e) for e in buf.entries[:buf.nent]]
            if err == errno.E2BIG and n < _CPUID_LIMIT:
                n *= 2
            elif err != errno.EINTR:
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID: {os.strerror(err)}", err)

    def create_vm(self) -> Vm:
        """A new VM (type 0, the default x86 VM)."""
        fd = kvm_ioctl(self._checked_fd(), KVM_CREATE_VM, 0)
        return Vm(fd, self.vcpu_mmap_size)

    def _checked_fd(self) -> int:
        if self.fd < 0:
            raise KvmError(f"{self.path} is closed", errno.EBADF)
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kvm_available(path: str = "/dev/kvm") -> str | None:
    """None when ``path`` opens as a usable KVM; otherwise why not (one line)."""
    try:
        Kvm(path).close()
    except KvmError as exc:
        return str(exc)
    return None
