"""Network faults injected into the net backend's link: the ``fault`` kinds
``net-drop``, ``net-dup``, ``net-reorder``, ``net-corrupt`` and ``link-flap``.

Owns :class:`NetFaults` (the control endpoint's
:class:`~dvmm_shared.vhost_user.control_host.DeviceFaults` hook: arguments
checked, faults armed from the control thread) and :class:`FaultyLink`, a
:class:`~.link.Link` wrapper the device's rings talk to, which applies the
armed fault to frames on the daemon's loop.  Directions are seen from the
guest: ``rx`` frames go to the guest (the link's ``recv``), ``tx`` frames
come from it (``send``).  A fault lasts ``count`` frames or ``ms``
milliseconds, whichever is given (default: 1 frame).

What each does to a frame:

* drop — read (rx) or taken (tx) and discarded, as a lossy wire would;
* dup — delivered twice;
* reorder — held back and delivered after the next frame (rx: or at the end
  of the receive round, when no other frame is waiting; tx: with the next
  frame the guest sends, which TCP's retransmission guarantees);
* corrupt — bits flipped where the receiver detects it, as a wire's FCS
  would: the IPv4 header's identification (Linux verifies the IPv4 header
  checksum in software, whatever the offloads), or for any other frame the
  EtherType (an unknown protocol, dropped).  Payload corruption would be
  undetectable under checksum offload (``VIRTIO_NET_HDR_F_NEEDS_CSUM``/
  ``DATA_VALID``: the receiver trusts the sender's checksum), a breach of
  the offload contract rather than a link fault;
* link-flap — no frame forwarded either way for ``ms``.  With QEMU 7.2 as the
  frontend the backend cannot flip the guest-visible LINK_UP bit (QEMU keeps
  the virtio-net config space itself: ``--no-config-space``), so the link
  goes quiet instead of down; the guest sees carrier loss only through its
  frames being lost.

tx frames are copied before corruption or holding: a guest's transmit
buffer is never written (TCP retransmits from it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dvmm_shared.control import ControlError
from dvmm_shared.vhost_user.control_host import int_arg

from .link import Link

KINDS = ("net-drop", "net-dup", "net-reorder", "net-corrupt", "link-flap")
DIRECTIONS = ("rx", "tx", "both")
MAX_COUNT = 1 << 20
MAX_MS = 60_000
ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_JUNK = 0x88B5  # IEEE 802 "local experimental": no stack takes it


@dataclass
class Armed:
    """One armed fault on one direction: ``left`` frames or until ``until``."""

    mode: str
    left: int | None
    until: float | None
    hits: int = 0

    def take(self, now: float) -> bool:
        """Whether the fault hits this frame (and count it)."""
        if self.until is not None:
            if now >= self.until:
                return False
        elif self.left is None or self.left <= 0:
            return False
        if self.left is not None:
            self.left -= 1
        self.hits += 1
        return True

    def spent(self, now: float) -> bool:
        return (now >= self.until) if self.until is not None else not self.left

    def describe(self, now: float) -> dict[str, Any]:
        return {"mode": self.mode, "left": self.left, "hits": self.hits,
                "ms_left": None if self.until is None else max(0, round(
                    (self.until - now) * 1000))}


@dataclass
class NetFaults:
    """The armed faults per direction (replaced whole by the control thread)."""

    kinds: tuple[str, ...] = KINDS
    armed: dict[str, Armed | None] = field(default_factory=lambda: {"rx": None, "tx": None})
    flap_until: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)   # frames hit, per mode

    def apply(self, kind: str, req: dict[str, Any]) -> dict[str, Any]:
        count, ms = int_arg(req, "count", 1, MAX_COUNT), int_arg(req, "ms", 1, MAX_MS)
        if kind == "link-flap":
            if ms is None:
                raise ControlError("fault link-flap needs ms")
            self.flap_until = time.monotonic() + ms / 1000
            return {"ms": ms}
        direction = req.get("direction", "both")
        if not isinstance(direction, str) or direction not in DIRECTIONS:
            raise ControlError(f"fault {kind}: direction must be one of {', '.join(DIRECTIONS)}")
        if count is not None and ms is not None:
            raise ControlError(f"fault {kind}: give count or ms, not both")
        if count is None and ms is None:
            count = 1
        until = time.monotonic() + ms / 1000 if ms is not None else None
        for d in ("rx", "tx") if direction == "both" else (direction,):
            self.armed[d] = Armed(kind.removeprefix("net-"), count, until)
        return {"direction": direction, "count": count, "ms": ms}

    def clear(self) -> None:
        self.armed = {"rx": None, "tx": None}
        self.flap_until = 0.0

    def describe(self) -> dict[str, Any] | None:
        now = time.monotonic()
        out: dict[str, Any] = {d: a.describe(now) for d, a in self.armed.items()
                               if a is not None and not a.spent(now)}
        if self.flap_until > now:
            out["link_flap_ms_left"] = round((self.flap_until - now) * 1000)
        return out or None

    def hit(self, direction: str) -> str | None:
        """The fault mode for the next frame in ``direction``, if any ("flap" first)."""
        now = time.monotonic()
        armed = self.armed[direction]
        if now < self.flap_until:
            mode: str | None = "flap"
        else:
            mode = armed.mode if armed is not None and armed.take(now) else None
        if mode is not None:
            self.totals[mode] = self.totals.get(mode, 0) + 1
        return mode


def corrupt(frame: bytearray, hdr_len: int) -> None:
    """Flip bits the receiver checks (module docstring), in place."""
    eth = hdr_len
    if len(frame) < eth + ETH_HLEN:
        return
    if int.from_bytes(frame[eth + 12:eth + 14], "big") == ETH_P_IP and \
            len(frame) >= eth + ETH_HLEN + 20:
        frame[eth + ETH_HLEN + 4] ^= 0xA5  # identification: the header checksum fails
    else:
        frame[eth + 12:eth + 14] = ETH_P_JUNK.to_bytes(2, "big")


def _scatter(data: bytes, bufs: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``bufs``; len(data) (more than fits: the caller sees a cut)."""
    off = 0
    for b in bufs:
        n = min(len(b), len(data) - off)
        if n <= 0:
            break
        b[:n] = data[off:off + n]
        off += n
    return len(data)


def _gather(bufs: Sequence[memoryview], n: int) -> bytearray:
    out = bytearray()
    for b in bufs:
        if len(out) >= n:
            break
        out += b[:n - len(out)]
    return out


class FaultyLink:
    """A :class:`Link` whose frames suffer the faults armed in :class:`NetFaults`."""

    def __init__(self, inner: Link, faults: NetFaults) -> None:
        self.inner, self.faults = inner, faults
        self.hdr_len = 0
        self._rx_pending: list[bytes] = []        # frames owed to the guest
        self._tx_held: dict[int, list[bytes]] = {}  # per pair: frames held back

    # -- the Link face, passed through ---------------------------------------------
    @property
    def vnet_hdr(self) -> bool:
        return self.inner.vnet_hdr

    @property
    def pairs(self) -> int:
        return self.inner.pairs

    @property
    def description(self) -> str:
        return self.inner.description

    def fileno(self, pair: int) -> int:
        return self.inner.fileno(pair)

    def reopen(self, pair: int) -> None:
        self.inner.reopen(pair)

    def set_vnet_header(self, size: int, offloads: int) -> None:
        self.hdr_len = size if self.inner.vnet_hdr else 0
        self.inner.set_vnet_header(size, offloads)

    def set_pair_active(self, pair: int, active: bool) -> None:
        self.inner.set_pair_active(pair, active)

    def close(self) -> None:
        self.inner.close()

    # -- frames ---------------------------------------------------------------------
    def recv(self, pair: int, bufs: Sequence[memoryview]) -> int:
        if self._rx_pending:
            return _scatter(self._rx_pending.pop(0), bufs)
        while True:
            try:
                n = self.inner.recv(pair, bufs)
            except BlockingIOError:
                if self._rx_pending:  # a held frame: nothing else is coming now
                    return _scatter(self._rx_pending.pop(0), bufs)
                raise
            mode = self.faults.hit("rx")
            if mode in ("drop", "flap"):
                continue  # read and thrown away: try the next frame
            if mode is None or n > sum(len(b) for b in bufs):
                return n  # a frame cut short is the device's to drop
            frame = _gather(bufs, n)
            if mode == "dup":
                self._rx_pending.append(bytes(frame))
            elif mode == "corrupt":
                corrupt(frame, self.hdr_len)
                _scatter(bytes(frame), bufs)
            elif mode == "reorder":
                self._rx_pending.append(bytes(frame))
                continue  # deliver the next frame first
            return n

    def send(self, pair: int, bufs: Sequence[memoryview]) -> None:
        mode = self.faults.hit("tx")
        if mode in ("drop", "flap"):
            return
        if mode is None:
            self.inner.send(pair, bufs)
        elif mode == "reorder":
            self._tx_held.setdefault(pair, []).append(bytes(_gather(bufs, 1 << 30)))
            return
        elif mode == "dup":
            self.inner.send(pair, bufs)
            self._send_copy(pair, bytes(_gather(bufs, 1 << 30)))
        else:
            frame = _gather(bufs, 1 << 30)
            corrupt(frame, self.hdr_len)
            self.inner.send(pair, [memoryview(frame)])
        for held in self._tx_held.pop(pair, []):
            self._send_copy(pair, held)

    def _send_copy(self, pair: int, frame: bytes) -> None:
        """A frame of our own (duplicate, held back): a full link drops it, as a wire would."""
        try:
            self.inner.send(pair, [memoryview(frame)])
        except BlockingIOError:
            pass
