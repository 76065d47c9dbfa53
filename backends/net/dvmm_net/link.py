"""The link interface: where the device's frames go and come from.

The device does not care whether a link is a TAP (:mod:`.tap`) or a
VM-to-VM socket (:mod:`.peer`); tests hand it a socketpair.  A link moves
whole frames between a list of guest-memory slices and the outside, one
system call each way (zero copy), and offers one fd per queue pair for the
device to wait on.  It never touches rings.

``vnet_hdr`` says whether the link's frames start with the virtio-net
header: a TAP opened with ``IFF_VNET_HDR`` takes and gives it (so checksum
and segmentation offloads work end to end), a peer socket carries bare
Ethernet frames and the device strips and adds the header itself.

The fd of a pair may change (a peer connects, or goes away): the link says
so by raising :class:`LinkChanged` from ``recv``; the device then stops
watching the old fd, calls ``reopen`` and watches ``fileno`` again.  A link
only closes or replaces an fd in ``reopen``, ``set_pair_active`` and
``close``, and the device stops watching before it calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Linux <linux/if_tun.h> TUNSETOFFLOAD bits: what the link may hand the
# device (checksum left partial, TCP segments up to 64 KiB).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10


class LinkError(Exception):
    """The link cannot be opened or set up (reported as one line at start-up)."""


class LinkDown(Exception):
    """Nobody at the other end right now: the frame is dropped."""


class LinkChanged(Exception):
    """The pair's fd is about to change: unwatch it, ``reopen``, watch again."""


class Link(Protocol):
    """What the net device needs from the outside world."""

    @property
    def vnet_hdr(self) -> bool:
        """Frames on the link carry the virtio-net header (offloads possible)."""

    @property
    def pairs(self) -> int:
        """How many queue pairs the link serves (one fd each)."""

    @property
    def description(self) -> str: ...

    def fileno(self, pair: int) -> int:
        """The fd to wait on for the pair (readable: a frame or an event)."""

    def recv(self, pair: int, bufs: Sequence[memoryview]) -> int:
        """Read one frame into ``bufs``; the bytes read, or more (a socket
        reports a record's full length).  A frame longer than the buffers is
        cut: the caller adds a spare byte to tell a full fit from a cut.
        Raises BlockingIOError when nothing is waiting, LinkChanged, OSError."""

    def send(self, pair: int, bufs: Sequence[memoryview]) -> None:
        """Write one frame gathered from ``bufs``.  Raises BlockingIOError when
        the link is full (wait for the fd to be writable), LinkDown, OSError."""

    def reopen(self, pair: int) -> None:
        """After LinkChanged: accept or reconnect; ``fileno`` may differ."""

    def set_vnet_header(self, size: int, offloads: int) -> None:
        """Header size (10 or 12) and the TUN_F_* offloads the driver accepts."""

    def set_pair_active(self, pair: int, active: bool) -> None:
        """Whether the outside may queue frames for this pair (multi-queue TAP)."""

    def close(self) -> None: ...
