"""A TAP device as the link: frames to and from the host's network stack.

Owns the TAP file descriptors and their ioctls (Linux
``Documentation/networking/tuntap.rst``): ``TUNSETIFF`` on ``/dev/net/tun``
attaches to an existing TAP with ``IFF_NO_PI | IFF_VNET_HDR`` (each frame
is preceded by the virtio-net header, so the kernel does checksums and
segmentation for the guest), ``TUNSETVNETHDRSZ`` sets that header's size and
``TUNSETOFFLOAD`` what the driver accepts.  With several queue pairs the TAP
must have been created ``multi_queue``: the same name is opened once per
pair with ``IFF_MULTI_QUEUE`` and each fd is one queue.  ``--tap-fd`` takes
fds someone else opened (the core, a container runtime).

The backend never creates the interface: a TAP that does not exist is a
start-up error (as root, ``TUNSETIFF`` would silently create a new one).
Data moves with ``os.readv``/``os.writev`` straight between the fd and
guest memory.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence

from dvmm_shared.cli import one_line

from .header import HDR_LEN
from .link import LinkError

log = logging.getLogger("dvmm.net")

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
# <linux/if_tun.h>: _IOW('T', 202, int) etc.
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then the flags union member
_INT = struct.Struct("i")


def _ifreq(name: str, flags: int) -> bytes:
    return _IFREQ.pack(name.encode(), flags)


class TapLink:
    """One TAP interface, one fd per queue pair."""

    def __init__(self, name: str, fds: Sequence[int], *, vnet_hdr: bool,
                 multi_queue: bool) -> None:
        self.name = name
        self._fds = list(fds)
        self._vnet_hdr = vnet_hdr
        self.multi_queue = multi_queue
        self._attached = [True] * len(self._fds)
        self._hdr_size = HDR_LEN
        self._offloads = 0

    # -- opening ----------------------------------------------------------------
    @classmethod
    def open(cls, name: str, queues: int = 1) -> TapLink:
        """Attach to the existing TAP ``name`` with ``queues`` queues."""
        if not name or len(name) >= IFNAMSIZ or "/" in name:
            raise LinkError(f"{name!r} is not a network interface name")
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise LinkError(f"there is no network interface {name} "
                            f"(create it with: ip tuntap add dev {name} mode tap)") from None
        multi = queues > 1
        fds: list[int] = []
        try:
            for _ in range(queues):
                fd, multi = _attach(name, multi, retry_multi=queues == 1)
                fds.append(fd)
            link = cls(name, fds, vnet_hdr=True, multi_queue=multi)
            link.set_vnet_header(HDR_LEN, 0)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return link

    @classmethod
    def from_fds(cls, fds: Sequence[int]) -> TapLink:
        """Use TAP queue fds opened by someone else (``--tap-fd``)."""
        names, flags_seen = set(), set()
        for fd in fds:
            name, flags = _tap_info(fd)
            names.add(name)
            flags_seen.add(flags & (IFF_VNET_HDR | IFF_MULTI_QUEUE))
            os.set_blocking(fd, False)
        if len(names) != 1 or len(flags_seen) != 1:
            raise LinkError(f"the --tap-fd fds are not queues of one TAP: {sorted(names)}")
        flags = flags_seen.pop()
        if len(fds) > 1 and not flags & IFF_MULTI_QUEUE:
            raise LinkError("several --tap-fd fds but the TAP is not multi_queue")
        link = cls(names.pop(), fds, vnet_hdr=bool(flags & IFF_VNET_HDR),
                   multi_queue=bool(flags & IFF_MULTI_QUEUE))
        if link.vnet_hdr:
            link.set_vnet_header(HDR_LEN, 0)
        return link

    # -- Link -------------------------------------------------------------------
    @property
    def vnet_hdr(self) -> bool:
        return self._vnet_hdr

    @property
    def pairs(self) -> int:
        return len(self._fds)

    @property
    def description(self) -> str:
        mq = f", {len(self._fds)} queues" if self.multi_queue else ""
        hdr = "" if self._vnet_hdr else ", no vnet header"
        return f"TAP {self.name}{mq}{hdr}"

    def fileno(self, pair: int) -> int:
        return self._fds[pair]

    def recv(self, pair: int, bufs: Sequence[memoryview]) -> int:
        # A frame longer than the buffers is cut and the rest dropped; the
        # read then returns the buffers' length (tun_chr_read_iter caps it).
        return os.readv(self._fds[pair], bufs)

    def send(self, pair: int, bufs: Sequence[memoryview]) -> None:
        if len(bufs) == 1:  # the usual frame: write() skips building an iovec list
            os.write(self._fds[pair], bufs[0])
        else:
            os.writev(self._fds[pair], bufs)

    def reopen(self, pair: int) -> None:
        """A TAP's fds never change."""

    def set_vnet_header(self, size: int, offloads: int) -> None:
        """Per TAP, not per queue: applied through any attached queue, and
        again whenever a queue is attached."""
        self._hdr_size, self._offloads = size, offloads
        fd = self._device_fd()
        if fd is None or not self._vnet_hdr:
            return
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, _INT.pack(size))
            fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
        except OSError as exc:
            log.warning("TAP %s: cannot set vnet header %d / offloads %#x: %s",
                        self.name, size, offloads, one_line(exc))

    def set_pair_active(self, pair: int, active: bool) -> None:
        """Attach or detach a queue of a multi-queue TAP, so the kernel only
        steers frames to queues that a running ring drains."""
        if not self.multi_queue or self._attached[pair] == active:
            return
        flag = IFF_ATTACH_QUEUE if active else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self._fds[pair], TUNSETQUEUE, _ifreq("", flag))
        except OSError as exc:
            log.warning("TAP %s: cannot %s queue %d: %s", self.name,
                        "attach" if active else "detach", pair, one_line(exc))
            return
        self._attached[pair] = active
        if active:
            self.set_vnet_header(self._hdr_size, self._offloads)

    def _device_fd(self) -> int | None:
        for fd, attached in zip(self._fds, self._attached, strict=True):
            if attached:
                return fd
        return None

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _attach(name: str, multi: bool, *, retry_multi: bool) -> tuple[int, bool]:
    """Open one queue of TAP ``name``; returns the fd and whether it is multi-queue."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LinkError(f"cannot open {TUN_DEVICE}: {one_line(exc)}") from None
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags | (IFF_MULTI_QUEUE if multi else 0)))
        except OSError as exc:
            if exc.errno != errno.EINVAL or not retry_multi:
                raise
            # One queue asked for, but the TAP was created multi_queue.
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags | IFF_MULTI_QUEUE))
            multi = True
    except OSError as exc:
        os.close(fd)
        raise LinkError(_attach_error(name, multi, exc)) from None
    return fd, multi


def _attach_error(name: str, multi: bool, exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return (f"not permitted to attach TAP {name} (it belongs to another user; "
                "create it with: ip tuntap add dev NAME mode tap user YOU)")
    if exc.errno == errno.EBUSY:
        return f"TAP {name} is already in use by another process"
    if exc.errno == errno.EINVAL:
        if multi:
            return (f"{name} is not a multi-queue TAP (create it with: "
                    f"ip tuntap add dev {name} mode tap multi_queue)")
        return f"{name} is not a TAP device"
    return f"cannot attach TAP {name}: {one_line(exc)}"


def _tap_info(fd: int) -> tuple[str, int]:
    """Name and flags of the TAP behind an inherited fd."""
    try:
        out = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise LinkError(f"--tap-fd {fd} is not an open file descriptor") from None
        raise LinkError(f"--tap-fd {fd} is not a TAP: {one_line(exc)}") from None
    raw, flags = _IFREQ.unpack(out)
    name = raw.split(b"\0", 1)[0].decode(errors="replace")
    if not flags & IFF_TAP:
        raise LinkError(f"--tap-fd {fd} is a TUN (layer 3) device, not a TAP")
    if not flags & IFF_NO_PI:
        raise LinkError(f"--tap-fd {fd}: the TAP was opened without IFF_NO_PI")
    return name, flags
