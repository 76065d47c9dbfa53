"""The vhost-user backend daemon: the frontend's messages in, the rings served.

Owns the backend side of the protocol state (negotiated features, the
memory table, each vring's size, addresses, base, kick/call fds and its
started/enabled state) and one event loop that waits on the frontend socket
and every started ring's kick eventfd.  When a kick arrives it drains the
queue through the device (:class:`VhostUserBackend`), pushes used elements
and signals the call eventfd when the driver wants an interrupt.

One loop serves the socket and all queues: a frontend message and queue
processing never run at the same time, so no ring state needs a lock.  A
backend fed by something other than kicks (net RX from a TAP) watches its
own fds on the same loop through the session (:class:`BackendHost`), and is
told when each ring starts and stops being served.

Hostile input: a message that fails to decode or cannot be honoured gets a
failure reply (when one is expected) and a one-line log; a bad descriptor
chain is returned to the driver with 0 bytes written; a broken available
ring stops that ring.  A frontend disconnect resets everything and the
daemon waits for the next frontend.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import FrameType

from ..eventfd import EventFd
from ..memory import GuestMemory, GuestMemoryError, Region
from ..virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
from ..virtqueue import ChainError, QueueError, RingError, RingLayout, SplitQueue
from .backend import BackendStats, VhostUserBackend
from .connection import Connection, ConnectionClosed, Message
from .message import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    MemRegion,
    MessageError,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    decode_vring_fd_index,
    encode_u64,
    request_name,
)

log = logging.getLogger("dvmm.vhost_user")

MAX_MEM_SLOTS = 32
DAEMON_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
)


class RequestFailed(Exception):
    """A well-formed request that cannot be honoured (reported to the frontend)."""


class RingState(Enum):
    STOPPED = "stopped"
    STARTED = "started"
    BROKEN = "broken"


@dataclass
class Vring:
    """Backend-side state of one ring, as the frontend configured it."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: EventFd | None = None
    call: EventFd | None = None
    err: EventFd | None = None
    enabled: bool = False
    state: RingState = RingState.STOPPED
    queue: SplitQueue | None = None

    @property
    def running(self) -> bool:
        """Started and enabled: the device may serve it."""
        return self.state is RingState.STARTED and self.enabled

    def close_fds(self) -> None:
        for efd in (self.kick, self.call, self.err):
            if efd is not None:
                efd.close()
        self.kick = self.call = self.err = None


class Session:
    """One frontend connection: protocol state machine plus ring service.

    Also the :class:`BackendHost` of the backend while the connection lasts."""

    def __init__(self, backend: VhostUserBackend, conn: Connection,
                 selector: selectors.BaseSelector, stats: BackendStats) -> None:
        self.backend = backend
        self.conn = conn
        self.sel = selector
        self.stats = stats
        self.features = 0
        self.protocol_features = 0
        self.mem = GuestMemory()
        # ADD_MEM_REG count per region (guest addr, size, user addr): QEMU's
        # vhost-user-net sends each queue pair's table over the one
        # connection, so with MQ every region is added (and removed) once
        # per pair; it stays mapped until the last REM_MEM_REG.
        self._region_refs: dict[tuple[int, int, int], int] = {}
        self.vrings = [Vring(i) for i in range(backend.num_queues)]
        # Extra fds the backend watches: fd -> {selector event: callback}.
        self._extra: dict[int, dict[int, Callable[[], None]]] = {}
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: lambda m: None,
            Request.RESET_OWNER: self._reset_owner,
            Request.RESET_DEVICE: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: lambda m: encode_u64(len(self.vrings)),
            Request.GET_MAX_MEM_SLOTS: lambda m: encode_u64(MAX_MEM_SLOTS),
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
        }
        backend.attach(self)

    # -- message dispatch -------------------------------------------------
    #: Requests whose reply is their answer (no REPLY_ACK on top).
    _REPLYING = frozenset({
        Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS,
    })

    def handle_message(self, msg: Message) -> None:
        req = msg.header.request
        name = request_name(req)
        handler = self._handlers.get(req)
        try:
            if handler is None:
                raise RequestFailed(f"unsupported {name}")
            log.debug("%s (%d bytes, %d fds)", name, len(msg.payload), len(msg.fds))
            answer = handler(msg)
            ok = True
        except (MessageError, RequestFailed, GuestMemoryError, QueueError, OSError) as exc:
            self.stats.protocol_errors += 1
            log.warning("%s failed: %s", name, exc)
            answer, ok = None, False
        finally:
            msg.close_fds()  # whatever the handler did not take
        if req in self._REPLYING:
            self.conn.send(req, answer or b"", reply=True)
        elif msg.header.need_reply:
            self.conn.send(req, encode_u64(0 if ok else 1), reply=True)

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.backend.features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload, "features")
        offered = self.backend.features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        if value & ~offered:
            raise RequestFailed(f"features {value & ~offered:#x} were not offered")
        self.features = value
        self.backend.set_features(value & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
        if not value & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
            for ring in self.vrings:  # without it, rings start enabled
                ring.enabled = True

    def _offered_protocol_features(self) -> int:
        offered = DAEMON_PROTOCOL_FEATURES | self.backend.protocol_features()
        if not self.backend.config_space:
            offered &= ~(1 << ProtocolFeature.CONFIG)
        return offered

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self._offered_protocol_features())

    def _set_protocol_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload, "protocol features")
        offered = self._offered_protocol_features()
        if value & ~offered:
            raise RequestFailed(f"protocol features {value & ~offered:#x} were not offered")
        self.protocol_features = value

    def _reset_owner(self, msg: Message) -> None:
        self.reset()

    # -- memory -------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        regions = decode_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise MessageError(f"memory table: {len(regions)} regions but {len(msg.fds)} fds")
        self._install_memory(GuestMemory.from_specs(
            r.spec(fd) for r, fd in zip(regions, msg.fds, strict=True)))
        self._region_refs = {_region_key(r): 1 for r in regions}

    def _add_mem_reg(self, msg: Message) -> None:
        region = decode_single_region(msg.payload)
        fd = msg.take_fd()
        if fd is None:
            raise MessageError("ADD_MEM_REG without an fd")
        key = _region_key(region)
        try:
            if key in self._region_refs:  # the same region, for another queue pair
                self._region_refs[key] += 1
                return
            if len(self.mem) >= MAX_MEM_SLOTS:
                raise RequestFailed(f"all {MAX_MEM_SLOTS} memory slots are in use")
            mem = GuestMemory(self.mem)
            mem.add(Region.map(region.spec(fd)))
        finally:
            os.close(fd)
        self._install_memory(mem)
        self._region_refs[key] = 1

    def _rem_mem_reg(self, msg: Message) -> None:
        region = decode_single_region(msg.payload)
        key = _region_key(region)
        if self._region_refs.get(key, 0) > 1:
            self._region_refs[key] -= 1
            return
        mem = GuestMemory(self.mem)
        mem.remove(region.guest_addr, region.size)
        self._install_memory(mem)
        self._region_refs.pop(key, None)

    # -- rings ----------------------------------------------------------------
    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestFailed(f"ring {index} does not exist ({len(self.vrings)} rings)")
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        st = VringState.decode(msg.payload)
        limit = self.backend.max_queue_size
        if not 0 < st.num <= limit or st.num & (st.num - 1):
            raise RequestFailed(f"ring size {st.num} is not a power of two <= {limit}")
        self._ring(st.index).num = st.num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.decode(msg.payload)
        ring = self._ring(addr.index)
        ring.addr = addr
        if ring.state is RingState.STARTED:
            self._stop(ring)
            self._start(ring)

    def _set_vring_base(self, msg: Message) -> None:
        st = VringState.decode(msg.payload)
        self._ring(st.index).base = st.num & 0xFFFF

    def _get_vring_base(self, msg: Message) -> bytes:
        ring = self._ring(VringState.decode(msg.payload).index)
        self._stop(ring)
        if ring.kick is not None:
            ring.kick.close()
            ring.kick = None
        return VringState(ring.index, ring.base).encode()

    def _vring_fd(self, msg: Message) -> tuple[Vring, EventFd | None]:
        index, has_fd = decode_vring_fd_index(msg.payload)
        ring = self._ring(index)
        fd = msg.take_fd() if has_fd else None
        if has_fd and fd is None:
            raise MessageError(f"{request_name(msg.header.request)} without its fd")
        return ring, (EventFd(fd) if fd is not None else None)

    def _set_vring_kick(self, msg: Message) -> None:
        ring, efd = self._vring_fd(msg)
        self._stop(ring)
        if ring.kick is not None:
            ring.kick.close()
        ring.kick = efd
        if efd is None:
            raise RequestFailed("polling mode (no kick fd) is not supported")
        self._start(ring)

    def _set_vring_call(self, msg: Message) -> None:
        ring, efd = self._vring_fd(msg)
        if ring.call is not None:
            ring.call.close()
        ring.call = efd

    def _set_vring_err(self, msg: Message) -> None:
        ring, efd = self._vring_fd(msg)
        if ring.err is not None:
            ring.err.close()
        ring.err = efd

    def _set_vring_enable(self, msg: Message) -> None:
        st = VringState.decode(msg.payload)
        ring = self._ring(st.index)
        was_running = ring.running
        ring.enabled = bool(st.num)
        if ring.state is RingState.STARTED:
            self._watch(ring, ring.enabled)
            if was_running and not ring.running:
                self.backend.queue_stopped(ring.index)
            if ring.enabled:
                if not was_running:
                    self.backend.queue_started(ring.index)
                self.service(ring)

    def _start(self, ring: Vring) -> None:
        """The frontend gave the kick fd: map the ring and start serving it."""
        if ring.addr is None or ring.num == 0:
            raise RequestFailed(f"ring {ring.index} kicked before its size and address")
        ring.queue = self._map_queue(ring)
        ring.state = RingState.STARTED
        self._watch(ring, ring.enabled)
        if ring.enabled:
            self.backend.queue_started(ring.index)
            self.service(ring)

    def _map_queue(self, ring: Vring, used_idx: int | None = None,
                   base: int | None = None) -> SplitQueue:
        assert ring.addr is not None
        a = ring.addr
        try:
            layout = RingLayout(
                ring.num,
                self.mem.user_to_guest(a.desc_user_addr, 16 * ring.num),
                self.mem.user_to_guest(a.avail_user_addr, 6 + 2 * ring.num),
                self.mem.user_to_guest(a.used_user_addr, 6 + 8 * ring.num),
            )
        except GuestMemoryError as exc:
            raise RequestFailed(f"ring {ring.index}: {exc}") from exc
        return SplitQueue(
            self.mem, layout, last_avail_idx=ring.base if base is None else base,
            used_idx=used_idx,
            event_idx=bool(self.features & 1 << VIRTIO_F_RING_EVENT_IDX),
            indirect=bool(self.features & 1 << VIRTIO_F_RING_INDIRECT_DESC),
        )

    def _stop(self, ring: Vring) -> None:
        if ring.running:  # first: the device may give chains back to the ring
            self.backend.queue_stopped(ring.index)
        if ring.queue is not None:
            ring.base = ring.queue.last_avail_idx
            ring.queue.release()
            ring.queue = None
        if ring.state is not RingState.STOPPED:
            self._watch(ring, False)
        ring.state = RingState.STOPPED

    def _install_memory(self, mem: GuestMemory) -> None:
        """Switch to a new memory table, all or nothing: every started ring is
        re-translated in it first (keeping its position); if one does not fit,
        the old table and rings stay and the request fails."""
        old, self.mem = self.mem, mem
        started = [(r, r.queue) for r in self.vrings
                   if r.state is RingState.STARTED and r.queue is not None]
        try:
            remapped = [self._map_queue(r, used_idx=q.used_idx, base=q.last_avail_idx)
                        for r, q in started]
        except (RequestFailed, QueueError):
            self.mem = old
            raise
        for (ring, queue), new in zip(started, remapped, strict=True):
            ring.base = queue.last_avail_idx
            queue.release()
            ring.queue = new

    def _watch(self, ring: Vring, on: bool) -> None:
        if ring.kick is None:
            return
        key = self.sel.get_map().get(ring.kick.fd)
        if on and key is None:
            self.sel.register(ring.kick.fd, selectors.EVENT_READ, ("kick", ring.index))
        elif not on and key is not None:
            self.sel.unregister(ring.kick.fd)

    # -- config -----------------------------------------------------------
    def _get_config(self, msg: Message) -> bytes:
        cfg = ConfigSpace.decode(msg.payload)
        data = self.backend.get_config(cfg.offset, cfg.size)
        data = data[:cfg.size].ljust(cfg.size, b"\0")
        return ConfigSpace(cfg.offset, cfg.size, cfg.flags, data).encode()

    def _set_config(self, msg: Message) -> None:
        cfg = ConfigSpace.decode(msg.payload)
        self.backend.set_config(cfg.offset, cfg.data)

    # -- ring service ---------------------------------------------------------
    def on_kick(self, index: int) -> None:
        ring = self.vrings[index]
        if ring.kick is not None:
            ring.kick.consume()
        self.stats.queue(index).kicks += 1
        self.service(ring)

    def service(self, ring: Vring) -> None:
        """Drain a ring through the device, then notify if the driver wants it."""
        queue = ring.queue
        if queue is None or not ring.enabled or ring.state is not RingState.STARTED:
            return
        try:
            while True:
                pushed = self.backend.process_queue(ring.index, queue, self.serve)
                if pushed and queue.needs_notification():
                    self.notify(ring)
                if not queue.enable_notification():
                    break
        except RingError as exc:
            log.error("ring %d is broken, stopped until the frontend resets it: %s",
                      ring.index, exc)
            was_running = ring.running
            ring.state = RingState.BROKEN
            self._watch(ring, False)
            if was_running:
                self.backend.queue_stopped(ring.index)

    def serve(self, index: int, queue: SplitQueue) -> bool:
        """Default request/response loop: every available chain to handle_chain."""
        st = self.stats.queue(index)
        pushed = False
        while True:
            try:
                chain = queue.pop()
            except ChainError as exc:
                st.bad_chains += 1
                log.warning("queue %d: %s", index, exc)
                queue.push(exc.head, 0)
                pushed = True
                continue
            if chain is None:
                return pushed
            written = self.backend.handle_chain(index, chain)
            queue.push(chain.head, written)
            st.requests += 1
            pushed = True

    def notify(self, ring: Vring) -> None:
        if ring.call is not None:
            ring.call.signal()
            self.stats.queue(ring.index).notifications += 1

    # -- BackendHost: extra fds and on-demand service ---------------------------
    _EVENTS = (selectors.EVENT_READ, selectors.EVENT_WRITE)

    def watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is ready for ``events`` (level triggered)."""
        if events not in self._EVENTS:
            raise ValueError(f"watch events must be EVENT_READ or EVENT_WRITE, not {events}")
        cbs = self._extra.get(fd)
        if cbs is None:
            if fd in self.sel.get_map():
                raise ValueError(f"fd {fd} is already watched by the daemon")
            self._extra[fd] = {events: callback}
            self.sel.register(fd, events, ("extra", fd))
            return
        cbs[events] = callback
        self.sel.modify(fd, _mask(cbs), ("extra", fd))

    def unwatch(self, fd: int, events: int = selectors.EVENT_READ | selectors.EVENT_WRITE
                ) -> None:
        cbs = self._extra.get(fd)
        if cbs is None:
            return
        for ev in self._EVENTS:
            if ev & events:
                cbs.pop(ev, None)
        if cbs:
            self.sel.modify(fd, _mask(cbs), ("extra", fd))
        else:
            del self._extra[fd]
            self.sel.unregister(fd)

    def service_queue(self, index: int) -> None:
        if 0 <= index < len(self.vrings):
            self.service(self.vrings[index])

    def on_ready(self, fd: int, mask: int) -> None:
        """An extra fd is ready: run the callbacks still registered for it."""
        for ev in self._EVENTS:
            if mask & ev:
                callback = self._extra.get(fd, {}).get(ev)
                if callback is not None:
                    callback()

    # -- teardown -----------------------------------------------------------
    def reset(self) -> None:
        for ring in self.vrings:
            self._stop(ring)
            ring.close_fds()
        for fd in list(self._extra):  # whatever the backend did not unwatch
            self.unwatch(fd)
        self.vrings = [Vring(i) for i in range(self.backend.num_queues)]
        self.mem = GuestMemory()
        self._region_refs.clear()
        self.features = self.protocol_features = 0
        self.backend.reset()


class Daemon:
    """Listen on a Unix socket and serve one frontend at a time, until SIGTERM."""

    def __init__(self, backend: VhostUserBackend, socket_path: str) -> None:
        self._setup(backend, bind_unix_socket(socket_path), socket_path)

    @classmethod
    def listening(cls, backend: VhostUserBackend, socket_path: str | None,
                  fd: int | None) -> Daemon:
        """The backend program conventions: a socket path to create, or an
        inherited, already-listening socket (``--fd``)."""
        if fd is not None:
            return cls.from_listener(backend, socket.socket(fileno=fd))
        if socket_path is None:
            raise ValueError("a socket path or a listening fd is needed")
        return cls(backend, socket_path)

    @classmethod
    def from_listener(cls, backend: VhostUserBackend, listener: socket.socket) -> Daemon:
        """Serve on an inherited listening socket (``--fd``); nothing to unlink."""
        self = cls.__new__(cls)
        self._setup(backend, listener, None)
        return self

    def _setup(self, backend: VhostUserBackend, listener: socket.socket,
               path: str | None) -> None:
        self.backend = backend
        self.path = path
        self.listener = listener
        self.stats = BackendStats()
        self.sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._running = True

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._running = False
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def serve_forever(self) -> None:
        self.sel.register(self._stop_r, selectors.EVENT_READ, ("stop", 0))
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        log.info("listening on %s", self.path or f"fd {self.listener.fileno()}")
        session: Session | None = None
        try:
            while self._running:
                for key, mask in self.sel.select():
                    kind, index = key.data
                    if kind == "accept":
                        session = self._accept(session)
                    elif (kind == "msg" and session is not None
                          and key.fileobj is session.conn.sock):
                        # (an event of a session dropped earlier in this batch
                        # must not read from its replacement's socket)
                        session = self._on_message(session)
                    elif kind == "kick" and session is not None:
                        session.on_kick(index)
                    elif kind == "extra" and session is not None:
                        session.on_ready(index, mask)
                    elif kind == "stop":
                        self._running = False
        finally:
            if session is not None:
                self._end_session(session)
            self.close()

    def _accept(self, session: Session | None) -> Session:
        sock, _ = self.listener.accept()
        sock.set_inheritable(False)
        if session is not None:
            log.warning("a new frontend connected; dropping the previous one")
            self._end_session(session)
        self.stats.connections += 1
        log.info("frontend connected")
        conn = Connection(sock)
        self.sel.register(conn.sock, selectors.EVENT_READ, ("msg", 0))
        return Session(self.backend, conn, self.sel, self.stats)

    def _on_message(self, session: Session) -> Session | None:
        try:
            msg = session.conn.recv()
        except ConnectionClosed as exc:
            log.info("frontend disconnected (%s); waiting for the next one", exc)
            self._end_session(session)
            return None
        except (MessageError, OSError) as exc:
            self.stats.protocol_errors += 1
            log.warning("dropping the frontend: %s", exc)
            self._end_session(session)
            return None
        try:
            session.handle_message(msg)
        except OSError as exc:  # the reply could not be sent
            log.warning("dropping the frontend: %s", exc)
            self._end_session(session)
            return None
        return session

    def _end_session(self, session: Session) -> None:
        session.reset()
        self.sel.unregister(session.conn.sock)
        session.conn.close()

    def close(self) -> None:
        self.sel.close()
        self.listener.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.backend.close()


def _region_key(region: MemRegion) -> tuple[int, int, int]:
    return region.guest_addr, region.size, region.user_addr


def _mask(callbacks: dict[int, Callable[[], None]]) -> int:
    mask = 0
    for ev in callbacks:
        mask |= ev
    return mask


def bind_unix_socket(path: str) -> socket.socket:
    """Listen on ``path``; a stale socket file is replaced, any other file is not."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        else:
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass
    # Bind and listen under a temporary name, then rename into place: a
    # frontend that sees the socket file can connect at once (no window in
    # which it exists but refuses connections).
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        sock.listen(1)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return sock
