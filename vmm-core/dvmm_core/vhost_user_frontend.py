"""The core's vhost-user link to one device backend, and its recovery.

Owns the connection to a backend process, the order in which a device is
brought up and down over it, and bringing it back after the backend dies:

* connect: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER,
  GET_QUEUE_NUM, SET_MEM_TABLE (the guest RAM memfd);
* start (the guest set DRIVER_OK): SET_FEATURES, the in-flight region
  (GET_INFLIGHT_FD once, then SET_INFLIGHT_FD on every start), then for
  every enabled queue, in the fixed order, num, addr, base, call, kick,
  enable;
* stop (the guest reset the device): disable and GET_VRING_BASE per ring.

Recovery (:class:`LinkState`): the link remembers what the guest asked for
(driver features, started queues) and the device config it last read.  A
monitor thread notices the backend hanging up (POLLRDHUP on the socket); a
request that fails the same way has the same effect.  The device is then
*lost*: nothing guest-visible happens -- doorbells keep landing on the same
KVM ioeventfds (kicks accumulate in the eventfd counters), config reads are
answered from the cache, DRIVER_OK and resets only change what is
remembered.  The monitor reconnects (every 10 ms for 2 s, then backing off
to every 2 s, for as long as the VM runs or until the supervisor gives the
backend up) and
replays everything: negotiation, memory table, features, the *same*
in-flight region (so the backend resubmits what it had in flight) and every
ring at the used index the guest sees (virtio 1.2 2.7.8; the backend moves
past its in-flight requests itself, as the vhost-user spec's in-flight
tracking says).  Only a backend that *refuses* a request raises
:class:`LinkDown` (the transport then sets NEEDS_RESET).

Ring addresses travel as the core's own userspace addresses (the protocol
says so), translated from the guest-physical addresses the driver wrote.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dvmm_shared.memory import GuestMemory, GuestMemoryError
from dvmm_shared.vhost_user.connection import Connection, ConnectionClosed
from dvmm_shared.vhost_user.frontend import Frontend, FrontendError, RingSetup
from dvmm_shared.vhost_user.message import (
    HEADER,
    MAX_PAYLOAD,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    MemRegion,
    MessageError,
    ProtocolFeature,
    Request,
)

from .backend_channel import BackendChannel
from .inflight_region import InflightRegion

log = logging.getLogger("dvmm.vhost_user_frontend")

WANTED_PROTOCOL = (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
                   | 1 << ProtocolFeature.CONFIG | 1 << ProtocolFeature.INFLIGHT_SHMFD
                   | 1 << ProtocolFeature.BACKEND_REQ)

REPLY_TIMEOUT = 10.0
#: Reconnect attempts: every RECONNECT_START for the first RECONNECT_FAST
#: seconds of an outage (a restarted backend listens within a few hundred
#: ms; attempts on a missing socket cost a failed connect()), then doubling
#: up to RECONNECT_CAP for a backend that stays away.
RECONNECT_START = 0.010
RECONNECT_FAST = 2.0
RECONNECT_CAP = 2.0
#: How often the monitor looks at a connected socket (it is woken at once
#: by a hang-up; this only bounds how long close() waits for it).
MONITOR_TICK = 5.0

EventSink = Callable[[str, dict[str, Any]], None]
#: What :meth:`VhostUserLink.corrupt_message` can corrupt.
CORRUPT_MODES = ("version", "size")
KICK = (1).to_bytes(8, "little")
#: The errors that mean "the backend is gone" (as opposed to "it refused").
_GONE = (ConnectionClosed, MessageError, OSError)


class LinkDown(Exception):
    """The backend refused a request or is unreachable at start-up."""


class LinkState(Enum):
    DISCONNECTED = "disconnected"  # not connected yet
    CONNECTED = "connected"
    LOST = "lost"                  # the backend went away; reconnecting
    GIVEN_UP = "given-up"          # the supervisor gave the backend up
    CLOSED = "closed"


@dataclass(frozen=True)
class RamRegion:
    """A piece of guest RAM as the core maps it: what the memory table needs."""

    guest_addr: int
    size: int
    host_addr: int
    fd: int
    fd_offset: int


@dataclass(frozen=True)
class QueueStart:
    index: int
    size: int
    desc: int  # guest-physical
    driver: int
    device: int
    kick_fd: int
    call_fd: int


class VhostUserLink:
    """One backend connection, as used by a virtio-pci device of the core."""

    def __init__(self, name: str, socket_path: str, ram: Sequence[RamRegion],
                 config_size: int = 0, *, mem: GuestMemory | None = None,
                 on_event: EventSink | None = None) -> None:
        self.name = name
        self.config_size = config_size
        self.path = socket_path
        self.ram = list(ram)
        self.mem = mem
        self.on_event = on_event
        self.fe: Frontend | None = None
        self.state = LinkState.DISCONNECTED
        self.features = 0
        self.protocol = 0
        self.num_queues = 1
        self.restores = 0
        # What the guest asked for, replayed after a reconnect.
        self._driver_features: int | None = None
        self._queues: list[QueueStart] = []
        self._config: bytes | None = None
        self.inflight: InflightRegion | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        # Wakes the monitor out of poll() at close (closing the polled socket would not).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lost_at = 0.0
        self._lost_reason = ""
        self._monitor: threading.Thread | None = None
        # BACKEND_REQ: config-change messages -> the transport's interrupt.
        self.on_config_change: Callable[[], None] | None = None
        self._channel: BackendChannel | None = None

    # -- lifecycle ------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect (waiting up to ``timeout`` for the socket) and negotiate."""
        conn = _connect_retry(self.path, timeout)
        with self._lock:
            try:
                self._negotiate(conn, first=True)
            except _GONE as exc:
                conn.close()
                raise LinkDown(f"{self.name}: connect failed: {exc}") from exc
            except FrontendError as exc:
                conn.close()
                raise LinkDown(f"{self.name}: connect failed: {exc}") from exc
            self.state = LinkState.CONNECTED
        log.info("%s: connected to %s (features %#x, %d queues)", self.name, self.path,
                 self.features, self.num_queues)
        self._monitor = threading.Thread(target=self._monitor_loop, name=f"link-{self.name}",
                                         daemon=True)
        self._monitor.start()

    def _negotiate(self, conn: Connection, *, first: bool) -> None:
        # A backend that hangs (rather than dies) must not block a vCPU forever
        # on a config read: every reply has a deadline, and missing it is "gone".
        conn.sock.settimeout(REPLY_TIMEOUT)
        fe = Frontend(conn)
        features = fe.get_features()
        if not first and self._driver_features is not None and (
                self._driver_features & ~features):
            raise FrontendError(f"the new backend lacks features "
                                f"{self._driver_features & ~features:#x} the driver uses")
        protocol = 0
        if features & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
            protocol = fe.get_protocol_features() & WANTED_PROTOCOL
            fe.set_protocol_features(protocol)
        fe.set_owner()
        channel = (BackendChannel(self.name, fe, self._config_changed)
                   if protocol & 1 << ProtocolFeature.BACKEND_REQ else None)
        num_queues = fe.get_queue_num() if protocol & 1 << ProtocolFeature.MQ else 1
        if not first and num_queues < max((q.index + 1 for q in self._queues), default=0):
            raise FrontendError(f"the new backend has only {num_queues} queue(s)")
        fe.set_mem_table([MemRegion(r.guest_addr, r.size, r.host_addr, r.fd_offset)
                          for r in self.ram], [r.fd for r in self.ram])
        self.fe, self.features, self.protocol = fe, features, protocol
        self._channel = channel
        if first:
            self.num_queues = num_queues

    @property
    def device_features(self) -> int:
        """Virtio features the backend offers to the guest."""
        return self.features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device config space.  The whole structure is fetched
        from offset 0, as QEMU does: some backends (libvhost-user's blk in
        qemu-storage-daemon) ignore the offset of GET_CONFIG.  While the
        backend is away the last config read answers."""
        if not self.protocol & 1 << ProtocolFeature.CONFIG or offset + size > self.config_size:
            return bytes(size)
        with self._lock:
            if self.state is LinkState.CONNECTED:
                try:
                    self._config = self._fe().get_config(0, self.config_size)
                except _GONE as exc:
                    self._mark_lost(f"GET_CONFIG failed: {exc}")
                except FrontendError as exc:
                    raise LinkDown(f"{self.name}: GET_CONFIG failed: {exc}") from exc
            if self._config is None:
                raise LinkDown(f"{self.name}: backend {self.state.value}, no config known")
            return self._config[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if not self.protocol & 1 << ProtocolFeature.CONFIG:
            return
        with self._lock:
            if self.state is not LinkState.CONNECTED:
                log.warning("%s: config write dropped: backend %s", self.name,
                            self.state.value)
                return
            try:
                self._fe().set_config(offset, data)
            except _GONE as exc:
                self._mark_lost(f"SET_CONFIG failed: {exc}")
            except FrontendError as exc:
                raise LinkDown(f"{self.name}: SET_CONFIG failed: {exc}") from exc

    def start(self, driver_features: int, queues: Sequence[QueueStart]) -> None:
        """DRIVER_OK: give the backend the features and bring each ring up.
        Remembered first, so a backend that is away gets it on reconnect."""
        for q in queues:
            self._host(q.desc), self._host(q.driver), self._host(q.device)
        with self._lock:
            if self.state in (LinkState.DISCONNECTED, LinkState.CLOSED):
                raise LinkDown(f"{self.name}: not connected")
            self._driver_features, self._queues = driver_features, list(queues)
            if self.state is not LinkState.CONNECTED:
                log.info("%s: driver ready while the backend is %s; starts on reconnect",
                         self.name, self.state.value)
                return
            try:
                self._start_rings(fresh=True)
            except _GONE as exc:
                self._mark_lost(f"start failed: {exc}")
                return
            except FrontendError as exc:
                raise LinkDown(f"{self.name}: start failed: {exc}") from exc
        log.info("%s: started %d queue(s), features %#x", self.name, len(queues),
                 driver_features)

    def _start_rings(self, *, fresh: bool) -> int:
        """SET_FEATURES, the in-flight region, every ring; returns how many
        requests the backend was in the middle of (it replays them)."""
        fe = self._fe()
        assert self._driver_features is not None
        fe.set_features(self._driver_features
                        | (self.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES))
        replayed = 0
        if self.protocol & 1 << ProtocolFeature.INFLIGHT_SHMFD and self._queues:
            if self.inflight is None:
                size = max(q.size for q in self._queues)
                fd, info = fe.get_inflight_fd(self.num_queues, size)
                self.inflight = InflightRegion(fd, info)
            elif fresh:
                self.inflight.clear()  # a new driver session: nothing is in flight
            replayed = self.inflight.in_flight()
            fe.set_inflight_fd(self.inflight.fd, self.inflight.info)
        for q in self._queues:
            base = 0 if fresh else self._used_index(q)
            fe.start_ring(RingSetup(q.index, q.size, self._host(q.desc), self._host(q.driver),
                                    self._host(q.device), q.kick_fd, q.call_fd, base=base))
            if not fresh:
                # The dead backend may have consumed the guest's last kick and
                # died before popping the chain; a backend that waits for kicks
                # (libvhost-user) would never look.  One extra kick is harmless
                # (QEMU starts host notifiers at 1 for the same reason).
                os.write(q.kick_fd, KICK)
        return replayed

    def stop(self) -> None:
        """Device reset: stop every started ring (GET_VRING_BASE)."""
        with self._lock:
            started, self._queues = self._queues, []
            self._driver_features = None
            if not started or self.state is not LinkState.CONNECTED:
                return
            fe = self._fe()
            try:
                for q in started:
                    if self.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
                        fe.set_vring_enable(q.index, False)
                    base = fe.get_vring_base(q.index)
                    log.debug("%s: ring %d stopped at %d", self.name, q.index, base)
            except _GONE as exc:
                self._mark_lost(f"stop failed: {exc}")
            except FrontendError as exc:
                raise LinkDown(f"{self.name}: stop failed: {exc}") from exc

    def give_up(self, reason: str) -> None:
        """The backend will not come back (the supervisor gave it up)."""
        with self._lock:
            if self.state is LinkState.CLOSED:
                return
            self._drop()
            self.state = LinkState.GIVEN_UP
        log.error("%s: device offline: %s", self.name, reason)
        self._emit("device-offline", reason=reason)
        self._wake.set()

    def close(self) -> None:
        with self._lock:
            self._drop()
            self.state = LinkState.CLOSED
            if self.inflight is not None:
                self.inflight.close()
                self.inflight = None
        self._wake.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=5)
        if self._wake_r >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- recovery -----------------------------------------------------------
    def _mark_lost(self, reason: str) -> None:
        """(lock held) The backend went away: forget the connection, keep the rest."""
        if self.state is not LinkState.CONNECTED:
            return
        self._drop()
        self.state = LinkState.LOST
        self._lost_at = time.monotonic()
        self._lost_reason = reason
        log.warning("%s: backend lost (%s); reconnecting to %s", self.name, reason, self.path)
        self._emit("device-lost", reason=reason)
        self._wake.set()

    def _drop(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _config_changed(self) -> None:
        """(monitor thread) The backend's config space changed: forget the
        cached copy and let the transport interrupt the guest."""
        with self._lock:
            self._config = None
        self._emit("device-config-changed")
        if self.on_config_change is not None:
            self.on_config_change()

    def _monitor_loop(self) -> None:
        delay = RECONNECT_START
        attempts = 0
        while True:
            state = self.state
            if state is LinkState.CLOSED:
                return
            if state is LinkState.CONNECTED:
                self._watch_connection()
                delay, attempts = RECONNECT_START, 0
            elif state is LinkState.LOST:
                attempts += 1
                if self._try_reconnect(attempts):
                    continue
                self._wake.wait(delay)
                self._wake.clear()
                if time.monotonic() - self._lost_at > RECONNECT_FAST:
                    delay = min(RECONNECT_CAP, delay * 2)
            else:
                self._wake.wait()
                self._wake.clear()

    def _watch_connection(self) -> None:
        """Block until the backend hangs up (or a tick passes)."""
        fe, channel = self.fe, self._channel
        if fe is None:
            return
        poller = select.poll()
        try:
            fd = fe.conn.fileno()
            poller.register(fd, select.POLLRDHUP)
            poller.register(self._wake_r, select.POLLIN)
            if channel is not None and not channel.closed:
                poller.register(channel.fileno(), select.POLLIN)
        except (ValueError, OSError):
            return
        for ready, mask in poller.poll(MONITOR_TICK * 1000):
            if ready == fd and mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                with self._lock:
                    if self.fe is fe:
                        self._mark_lost("the backend hung up")
            elif channel is not None and not channel.closed and ready == channel.fileno():
                channel.serve_one()

    def _try_reconnect(self, attempts: int) -> bool:
        try:
            conn = Connection.connect(self.path, timeout=1.0)
        except OSError:
            return False
        with self._lock:
            if self.state is not LinkState.LOST:
                conn.close()
                return True
            try:
                self._negotiate(conn, first=False)
                replayed = self._start_rings(fresh=False) if self._queues else 0
            except (*_GONE, FrontendError, GuestMemoryError) as exc:
                self._drop()
                conn.close()
                # The first attempts often meet the dying backend's listener
                # (accepted, then reset): only a backend that stays away is news.
                fast = time.monotonic() - self._lost_at < RECONNECT_FAST
                log.log(logging.DEBUG if fast else logging.WARNING,
                        "%s: reconnect attempt %d failed: %s", self.name, attempts, exc)
                return False
            self.state = LinkState.CONNECTED
            self.restores += 1
            outage = (time.monotonic() - self._lost_at) * 1000
        log.warning("%s: backend restored after %.0f ms (%d request(s) replayed)", self.name,
                    outage, replayed)
        self._emit("device-restored", outage_ms=round(outage, 1), replayed=replayed,
                   attempts=attempts)
        return True

    def _used_index(self, q: QueueStart) -> int:
        """The used index the guest sees (virtio 1.2 2.7.8: ``used->idx`` at +2):
        the frontend's ring base after a backend vanished without GET_VRING_BASE."""
        if self.mem is None:
            return 0
        return int.from_bytes(self.mem.read(q.device + 2, 2), "little")

    # -- helpers --------------------------------------------------------------
    def _fe(self) -> Frontend:
        if self.fe is None:
            raise LinkDown(f"{self.name}: not connected")
        return self.fe

    def _host(self, gpa: int) -> int:
        for r in self.ram:
            if r.guest_addr <= gpa < r.guest_addr + r.size:
                return r.host_addr + gpa - r.guest_addr
        raise LinkDown(f"{self.name}: ring address {gpa:#x} is not in guest RAM")

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, {"name": self.name, **fields})
            except Exception:  # an event sink must never break recovery
                log.exception("event sink failed for %s", event)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "link": self.state.value, "socket": self.path,
                "restores": self.restores}

    def rings(self) -> list[dict[str, int]]:
        """Where each started ring stands in guest memory (virtio 1.2 2.7.6 /
        2.7.8: ``avail->idx`` and ``used->idx`` at +2): a request the guest
        made and the device has not answered shows as ``avail != used``."""
        if self.mem is None:
            return []
        out = []
        for q in self._queues:
            avail = int.from_bytes(self.mem.read(q.driver + 2, 2), "little")
            out.append({"index": q.index, "avail_idx": avail, "used_idx": self._used_index(q)})
        return out

    # -- fault injection ------------------------------------------------------
    def corrupt_message(self, mode: str) -> bool:
        """Send the backend one corrupted message (the ``corrupt-msg`` fault);
        whether the link was connected to send it.  Sent under the lock, so no
        request of ours is in the middle of its exchange.  A GET_FEATURES
        header whose flags carry version 2 (``version``; vhost-user.rst
        "Header": version bits 0-1 are 0x1) or announce a payload larger than
        any request has (``size``): a backend must take it as a protocol
        error and hang up; the monitor then reconnects and replays, as for
        any lost backend."""
        if mode not in CORRUPT_MODES:
            raise ValueError(f"mode must be one of {', '.join(CORRUPT_MODES)}")
        flags, size = ((VHOST_USER_VERSION ^ 0x3, 0) if mode == "version"
                       else (VHOST_USER_VERSION, MAX_PAYLOAD + 1))
        with self._lock:
            fe = self.fe
            if self.state is not LinkState.CONNECTED or fe is None:
                return False
            try:
                fe.conn.sock.sendall(HEADER.pack(Request.GET_FEATURES, flags, size))
            except OSError as exc:
                self._mark_lost(f"a corrupted message could not be sent: {exc}")
        log.warning("%s: fault injection: corrupted %s message sent", self.name, mode)
        return True


def _connect_retry(path: str, timeout: float) -> Connection:
    """Connect to a socket that a just-started backend may not have created yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Connection.connect(path, timeout=5.0)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                raise LinkDown(f"nobody listens on {path}: {exc.strerror}") from None
            time.sleep(0.005)  # a backend binds, then listens: a guest access may wait
        except (TimeoutError, OSError) as exc:
            raise LinkDown(f"cannot connect to {path}: {os.strerror(exc.errno or 0)}") from None

