"""One frontend connection: the vhost-user protocol state machine and ring service.

Owns the backend side of the protocol state (negotiated features, the
memory table, each vring's size, addresses, base, kick/call fds and its
started/enabled state, the in-flight region) and serving the rings when
kicked: it drains a queue through the device (:class:`VhostUserBackend`),
pushes used elements and signals the call eventfd when the driver wants an
interrupt.  It is also the :class:`BackendHost` a backend watches extra fds
through.  The event loop and the listening socket are :mod:`.daemon`'s; one
ring's state and the request loop are :mod:`.vring`'s.

Hostile input: a message that fails to decode or cannot be honoured gets a
failure reply (when one is expected) and a one-line log; a bad descriptor
chain is returned to the driver with 0 bytes written; a broken available
ring stops that ring.

In-flight tracking (INFLIGHT_SHMFD, vhost-user.rst "Inflight I/O
tracking"): GET_INFLIGHT_FD allocates a zeroed region, SET_INFLIGHT_FD maps
the one the frontend kept; when a ring starts with a region holding
requests a previous process took and did not complete, they are served
again first, in their original order (:mod:`dvmm_shared.inflight`).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..eventfd import EventFd
from ..inflight import InflightError, InflightRegion, state_offset
from ..memory import GuestMemory, GuestMemoryError, Region
from ..virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
from ..virtqueue import QueueError, RingError, RingLayout, SplitQueue
from .backend import BackendStats, StartChain, VhostUserBackend
from .connection import Connection, Message
from .message import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ConfigSpace,
    InflightInfo,
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
from .vring import (
    Faults,
    RequestFailed,
    RingState,
    Vring,
    publish_completions,
    serve_chains,
    start_chains,
)
from .watches import FdWatches

log = logging.getLogger("dvmm.vhost_user")

MAX_MEM_SLOTS = 32
DAEMON_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.INFLIGHT_SHMFD
)


@dataclass
class FdReply:
    """A handler's answer that carries an fd (closed here once sent)."""

    payload: bytes
    fd: int


class Session:
    """One frontend connection: protocol state machine plus ring service.

    Also the :class:`BackendHost` of the backend while the connection lasts."""

    def __init__(self, backend: VhostUserBackend, conn: Connection,
                 selector: selectors.BaseSelector, stats: BackendStats,
                 faults: Faults | None = None) -> None:
        self.backend = backend
        self.conn = conn
        self.sel = selector
        self.stats = stats
        self.faults = faults if faults is not None else Faults()
        self.inflight: InflightRegion | None = None
        self.backend_channel: Connection | None = None  # SET_BACKEND_REQ_FD
        self.features = 0
        self.protocol_features = 0
        self.mem = GuestMemory()
        # ADD_MEM_REG count per region (guest addr, size, user addr): QEMU's
        # vhost-user-net sends each queue pair's table over the one
        # connection, so with MQ every region is added (and removed) once
        # per pair; it stays mapped until the last REM_MEM_REG.
        self._region_refs: dict[tuple[int, int, int], int] = {}
        self.vrings = [Vring(i) for i in range(backend.num_queues)]
        self.watches = FdWatches(selector)  # extra fds the backend watches
        self._handlers: dict[int, Callable[[Message], bytes | FdReply | None]] = {
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
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
        }
        for request, handler in backend.extra_requests().items():
            self._handlers.setdefault(request, handler)
        backend.attach(self)

    # -- message dispatch -------------------------------------------------
    #: Requests whose reply is their answer (no REPLY_ACK on top).
    _REPLYING = frozenset({
        Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS,
        Request.GET_INFLIGHT_FD,
    })
    #: What a failed request whose reply is its answer gets (default: empty);
    #: mmap_size 0 is "no region", as libvhost-user answers.
    _FAILED_ANSWER: ClassVar[dict[int, bytes]] = {
        Request.GET_INFLIGHT_FD: InflightInfo(0, 0, 0, 0).encode(),
    }

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
        except (MessageError, RequestFailed, GuestMemoryError, QueueError, InflightError,
                OSError, ValueError) as exc:
            self.stats.protocol_errors += 1
            log.warning("%s failed: %s", name, exc)
            answer, ok = self._FAILED_ANSWER.get(req), False
        finally:
            msg.close_fds()  # whatever the handler did not take
        if isinstance(answer, FdReply):
            try:
                self.conn.send(req, answer.payload, [answer.fd], reply=True)
            finally:
                os.close(answer.fd)
        elif req in self._REPLYING:
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
        self._track(ring, ring.queue)
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
            inflight=ring.inflight,
        )

    def _stop(self, ring: Vring) -> None:
        if ring.running:  # first: the device may give chains back to the ring
            self.backend.queue_stopped(ring.index)
        if ring.queue is not None:
            ring.base = ring.queue.last_avail_idx
            ring.queue.release()
            ring.queue = None
        ring.inflight = None  # requests still in flight stay marked in the region
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

    # -- in-flight region (INFLIGHT_SHMFD) ---------------------------------------
    def _inflight_negotiated(self, msg: Message) -> InflightInfo:
        """The request's description, if it may change the region now: the
        protocol feature is negotiated and no ring is started (a started
        ring keeps tracking in the region it started with)."""
        if not self.protocol_features & 1 << ProtocolFeature.INFLIGHT_SHMFD:
            raise RequestFailed("INFLIGHT_SHMFD was not negotiated")
        info = InflightInfo.decode(msg.payload)
        started = [r.index for r in self.vrings if r.state is not RingState.STOPPED]
        if started:
            raise RequestFailed(f"{request_name(msg.header.request)} while rings {started} "
                                "are started")
        return info

    def _get_inflight_fd(self, msg: Message) -> FdReply:
        info = self._inflight_negotiated(msg)
        fd, region = InflightRegion.allocate(info.num_queues, info.queue_size, len(self.vrings),
                                             self.backend.state_size)
        self.inflight = region  # in use at once; SET_INFLIGHT_FD normally follows
        answer = InflightInfo(region.size, 0, info.num_queues, info.queue_size)
        self._hand_state(fd, answer, fresh=True)
        log.info("in-flight region: %d queues of %d entries, %d bytes",
                 info.num_queues, info.queue_size, region.size)
        return FdReply(answer.encode(), fd)

    def _set_inflight_fd(self, msg: Message) -> None:
        info = self._inflight_negotiated(msg)
        fd = msg.take_fd()
        if fd is None:
            raise MessageError("SET_INFLIGHT_FD without an fd")
        try:
            region = InflightRegion.map(fd, info.mmap_size, info.mmap_offset, info.num_queues,
                                        info.queue_size, len(self.vrings))
            # a cleared region (no ring ran on it since): a new driver session
            fresh = not any(q.version for q in map(region.queue, range(region.num_queues))
                            if q is not None)
            self._hand_state(fd, info, fresh=fresh)
        finally:
            os.close(fd)
        self.inflight = region
        log.info("in-flight region handed back: %d queues of %d entries",
                 info.num_queues, info.queue_size)

    def _hand_state(self, fd: int, info: InflightInfo, fresh: bool) -> None:
        """The device's state piece of the region's memfd, if it keeps one
        and the memfd holds it (a region from another backend may not)."""
        size = self.backend.state_size
        if not size:
            return
        offset = info.mmap_offset + state_offset(info.num_queues, info.queue_size)
        try:
            if os.fstat(fd).st_size < offset + size:
                log.warning("in-flight region has no room for the device state: not kept")
                return
            self.backend.state_region(fd, offset, fresh)
        except (OSError, ValueError) as exc:
            log.warning("device state in the in-flight region: %s", exc)

    def _track(self, ring: Vring, queue: SplitQueue) -> None:
        """Attach the ring to its in-flight region and resume from it."""
        tracker = self.inflight.queue(ring.index) if self.inflight is not None else None
        if tracker is None:
            return
        if ring.num > tracker.desc_num:
            log.warning("ring %d has %d entries, its in-flight region %d: not tracked",
                        ring.index, ring.num, tracker.desc_num)
            return
        ring.inflight = tracker
        # A region a previous process used: it may have published used
        # entries and died before signalling them.  The driver is signalled
        # once when the ring is next served (a spurious interrupt is allowed,
        # virtio 1.2 2.7.10; a lost one leaves a driver waiting for requests
        # the device already completed).
        ring.resignal = tracker.version != 0
        resubmitted = queue.recover_inflight(tracker)
        if resubmitted:
            log.info("ring %d: %d requests in flight are served again, resuming at %d",
                     ring.index, resubmitted, queue.last_avail_idx)
            self.stats.queue(ring.index).resubmitted += resubmitted

    # -- the back-end channel (BACKEND_REQ) ----------------------------------
    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self.protocol_features & 1 << ProtocolFeature.BACKEND_REQ:
            raise RequestFailed("BACKEND_REQ was not negotiated")
        fd = msg.take_fd()
        if fd is None:
            raise MessageError("SET_BACKEND_REQ_FD without an fd")
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket: refused, and the fd is ours to close
            os.close(fd)
            raise
        if self.backend_channel is not None:
            self.backend_channel.close()
        sock.settimeout(1.0)  # a frontend that does not read cannot hold the loop
        self.backend_channel = Connection(sock)

    def config_changed(self) -> bool:
        channel = self.backend_channel
        if channel is None:
            return False
        try:
            channel.send(BackendRequest.CONFIG_CHANGE_MSG)
        except OSError as exc:
            log.warning("config change not sent to the frontend: %s", exc)
            return False
        return True

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
        if self.faults.service_delay:
            time.sleep(self.faults.service_delay)
        try:
            while True:
                pushed = self.backend.process_queue(ring.index, queue, self.serve)
                if (pushed and queue.needs_notification()) or ring.resignal:
                    ring.resignal = False
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
        return serve_chains(self.backend, index, queue, self.stats.queue(index),
                            self.faults.crash_point)

    def notify(self, ring: Vring) -> None:
        # (the channel may drop or delay the call: fault injection, .channel)
        if ring.call is not None and self.faults.channel.call(self, ring):
            ring.call.signal()
            self.stats.queue(ring.index).notifications += 1

    # -- BackendHost: extra fds (:mod:`.watches`) and on-demand service ------------
    def watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        self.watches.watch(fd, events, callback)

    def unwatch(self, fd: int, events: int = selectors.EVENT_READ | selectors.EVENT_WRITE
                ) -> None:
        self.watches.unwatch(fd, events)

    def on_ready(self, fd: int, mask: int) -> None:
        self.watches.on_ready(fd, mask)

    def service_queue(self, index: int) -> None:
        if 0 <= index < len(self.vrings):
            self.service(self.vrings[index])

    def submit_chains(self, index: int, queue: SplitQueue, start: StartChain) -> bool:
        return start_chains(index, queue, self.stats.queue(index), start,
                            self.faults.crash_point)

    def complete(self, index: int, done: Sequence[tuple[int, int]]) -> None:
        """Publish chains a device completed later (on the loop thread).

        They go to the ring's current queue, which may have been re-mapped
        since the chains were taken (a new memory table); a ring that is
        gone drops them, and with in-flight tracking they stay marked in its
        region, to be served again at the next start."""
        ring = self.vrings[index] if 0 <= index < len(self.vrings) else None
        queue = ring.queue if ring is not None else None
        if ring is None or queue is None:
            log.warning("ring %d is not mapped; %d completions dropped", index, len(done))
            return
        publish_completions(queue, done, self.stats.queue(index), self.faults.crash_point)
        if done and queue.needs_notification():
            self.notify(ring)

    # -- teardown -----------------------------------------------------------
    def reset(self) -> None:
        for ring in self.vrings:
            self._stop(ring)
            ring.close_fds()
        self.watches.clear()  # whatever the backend did not unwatch
        self.vrings = [Vring(i) for i in range(self.backend.num_queues)]
        self.mem = GuestMemory()
        self._region_refs.clear()
        self.inflight = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.features = self.protocol_features = 0
        self.backend.reset()


def _region_key(region: MemRegion) -> tuple[int, int, int]:
    return region.guest_addr, region.size, region.user_addr

