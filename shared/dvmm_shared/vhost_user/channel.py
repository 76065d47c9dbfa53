"""Notification faults of a backend (kicks and calls) and the safety net for lost ones.

Owns the ``fault`` kinds ``drop-kick``, ``delay-kick``, ``drop-call`` and
``delay-call`` (:class:`ChannelFaults`: armed from the control thread,
consumed on the daemon's loop) and the loop-side timers and safety net
(:class:`Notifications`) that the :class:`~.daemon.Daemon` runs.

Why a safety net.  virtio notifications are edge events on eventfds: a
kick (driver -> device, virtio 1.2 2.7.13 "Supplying Buffers to The
Device", the available index published and the doorbell written) and a
call (device -> driver, 2.7.14 "Receiving Used Buffers", the used index
published and the interrupt raised).  When one is lost — a frontend bug, a
notification coalesced across a reconnect, or this module's own faults —
nothing brings it back: a driver that waits for a completion without a
timeout (SeaBIOS, Linux virtio-blk) waits forever for work the device never
looked at, or for an interrupt about work already done.  So while a
frontend is connected the loop wakes every :data:`PERIOD` seconds and looks
at each running ring, which costs two 16-bit reads of guest memory:

* lost kick: the available index moved past what the device has *seen*
  and stayed there for a whole period — the ring is served as a kick would;
* lost call: used entries were published since the last call, the driver
  asked for an interrupt for them (``VIRTQ_AVAIL_F_NO_INTERRUPT`` clear, or
  with ``VIRTIO_F_EVENT_IDX`` ``used_event`` passed, 2.7.10), and the used
  index stayed there for a whole period — the call is signalled.  A
  spurious interrupt is harmless (2.7.14: the driver finds no new used
  entries).

A real lost notification is therefore recovered within one to two periods;
the rescues are counted (``rescued`` in the backend's ``stats``).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..virtio import VIRTQ_AVAIL_F_NO_INTERRUPT
from ..virtqueue import SplitQueue, vring_need_event

if TYPE_CHECKING:
    from .session import Session
    from .vring import Vring

log = logging.getLogger("dvmm.vhost_user")

#: Seconds between two looks of the safety net (a lost notification is
#: recovered after one to two of them).
PERIOD = 0.25
KINDS = ("drop-kick", "delay-kick", "drop-call", "delay-call")
MAX_COUNT = 1 << 20
MAX_DELAY_MS = 60_000


class ChannelFaults:
    """Armed notification faults; ``apply``/``clear``/``describe`` run on the
    control thread, ``take_kick``/``take_call`` on the daemon's loop."""

    kinds: tuple[str, ...] = KINDS

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.drop_kicks = 0        # kicks still to drop
        self.kick_delay = 0.0      # seconds the next kick waits (0: none armed)
        self.drop_calls = 0
        self.call_delay = 0.0
        self.delayed = 0           # delayed notifications not delivered yet
        self.dropped = {"kicks": 0, "calls": 0}
        self.rescued = {"kicks": 0, "calls": 0}
        #: Anything armed (the one attribute the unarmed fast path reads).
        self.armed = False

    def _rearm(self) -> None:
        """(lock held)"""
        self.armed = bool(self.drop_kicks or self.kick_delay or self.drop_calls
                          or self.call_delay)

    def apply(self, kind: str, req: dict[str, Any]) -> dict[str, Any]:
        """Arm ``kind`` from a ``fault`` request; ValueError (one line) if bad."""
        if kind in ("drop-kick", "drop-call"):
            count = _int(req, "count", 1, MAX_COUNT, 1)
            with self._lock:
                if kind == "drop-kick":
                    self.drop_kicks = count
                else:
                    self.drop_calls = count
                self._rearm()
            return {"count": count}
        if kind in ("delay-kick", "delay-call"):
            ms = _int(req, "ms", 1, MAX_DELAY_MS, None)
            with self._lock:
                if kind == "delay-kick":
                    self.kick_delay = ms / 1000
                else:
                    self.call_delay = ms / 1000
                self._rearm()
            return {"ms": ms}
        raise ValueError(f"fault kind must be one of {', '.join(KINDS)}")

    def clear(self) -> None:
        with self._lock:
            self.drop_kicks = self.drop_calls = 0
            self.kick_delay = self.call_delay = 0.0
            self.armed = False

    def describe(self) -> dict[str, Any]:
        """What is armed, pending and counted (the ``stats`` reply's ``channel``)."""
        return {"drop_kicks": self.drop_kicks, "kick_delay_ms": round(self.kick_delay * 1000),
                "drop_calls": self.drop_calls, "call_delay_ms": round(self.call_delay * 1000),
                "delayed": self.delayed, "dropped": dict(self.dropped),
                "rescued": dict(self.rescued)}

    def take_kick(self) -> float | None:
        """(loop) The fault the next kick meets: None, 0.0 (drop) or a delay."""
        return self._take("kick")

    def take_call(self) -> float | None:
        """(loop) The fault the next call meets: None, 0.0 (drop) or a delay."""
        return self._take("call")

    def _take(self, what: str) -> float | None:
        with self._lock:
            try:
                if what == "kick":
                    if self.drop_kicks:
                        self.drop_kicks -= 1
                        return 0.0
                    delay, self.kick_delay = self.kick_delay, 0.0
                else:
                    if self.drop_calls:
                        self.drop_calls -= 1
                        return 0.0
                    delay, self.call_delay = self.call_delay, 0.0
                if delay:
                    self.delayed += 1
                return delay or None
            finally:
                self._rearm()


def _int(req: dict[str, Any], key: str, lo: int, hi: int, default: int | None) -> int:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer {lo}..{hi}")
    return value


@dataclass
class _RingWatch:
    """What the safety net saw of one ring at its last look."""

    queue: SplitQueue
    avail: int
    used: int
    signalled: int          # the used index at the last call


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    fn: Callable[[], None] = field(compare=False)


class Notifications:
    """The loop side: kicks and calls through :class:`ChannelFaults`, delayed
    ones on timers, and the lost-notification safety net (module docstring).
    Everything here runs on the daemon's loop thread."""

    def __init__(self, faults: ChannelFaults) -> None:
        self.faults = faults
        self._timers: list[_Timer] = []
        self._seq = 0
        self._session: Session | None = None
        self._rings: dict[int, _RingWatch] = {}
        self._next_look = 0.0

    # -- the daemon's loop ----------------------------------------------------------
    def timeout(self, session: Session | None) -> float | None:
        """How long the loop may block in select (None: until an event)."""
        now = time.monotonic()
        due = [t.when for t in self._timers[:1]]
        if session is not None:
            due.append(self._next_look)
        return max(0.0, min(due) - now) if due else None

    def run_due(self, session: Session | None) -> None:
        """Fire the timers that are due, then look at the rings if it is time."""
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            heapq.heappop(self._timers).fn()
        if session is None:
            self._session, self._rings = None, {}
        elif now >= self._next_look:
            self._next_look = now + PERIOD
            self._look(session)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._timers, _Timer(time.monotonic() + delay, self._seq, fn))

    # -- kicks --------------------------------------------------------------------------
    def on_kick(self, session: Session, index: int) -> None:
        """A kick eventfd is readable: serve it, unless a fault drops or delays it."""
        ring = session.vrings[index]
        self._watch(session, ring)  # from before the request, so a lost call shows
        fault = self.faults.take_kick() if self.faults.armed else None
        if fault is None:
            session.on_kick(index)
            return
        if ring.kick is not None:
            ring.kick.consume()  # drained either way: the doorbell is gone
        if not fault:
            self.faults.dropped["kicks"] += 1
            log.warning("fault injection: kick of queue %d dropped", index)
            return
        log.warning("fault injection: kick of queue %d delayed %.0f ms", index, fault * 1000)

        def deliver() -> None:
            self.faults.delayed -= 1
            if session.vrings and index < len(session.vrings):
                session.stats.queue(index).kicks += 1
                session.service(session.vrings[index])
        self._later(fault, deliver)

    # -- calls --------------------------------------------------------------------------
    def call(self, session: Session, ring: Vring) -> bool:
        """Whether :meth:`Session.notify` signals now (False: a fault dropped
        or delayed it); records the used index the driver was told about."""
        watch = self._watch(session, ring)
        fault = self.faults.take_call() if self.faults.armed else None
        if fault is None:
            if watch is not None:
                watch.signalled = watch.queue.used_idx
            return True
        if not fault:
            self.faults.dropped["calls"] += 1
            log.warning("fault injection: call of queue %d dropped", ring.index)
            return False
        log.warning("fault injection: call of queue %d delayed %.0f ms", ring.index,
                    fault * 1000)
        call = ring.call

        def deliver() -> None:
            self.faults.delayed -= 1
            if call is ring.call and call is not None:  # the same eventfd, still open
                call.signal()
                session.stats.queue(ring.index).notifications += 1
        self._later(fault, deliver)
        return False

    # -- the safety net -----------------------------------------------------------------
    def _watch(self, session: Session, ring: Vring) -> _RingWatch | None:
        """The ring's watch, new (nothing owed) when its queue is new to us."""
        queue = ring.queue
        if queue is None:
            return None
        if session is not self._session:
            self._session, self._rings = session, {}
        watch = self._rings.get(ring.index)
        if watch is None or watch.queue is not queue:
            watch = _RingWatch(queue, queue.avail_idx(), queue.used_idx, queue.used_idx)
            self._rings[ring.index] = watch
        return watch

    def _look(self, session: Session) -> None:
        for ring in session.vrings:
            queue = ring.queue
            if queue is None or not ring.running:
                self._rings.pop(ring.index, None)
                continue
            known = self._rings.get(ring.index)
            watch = self._watch(session, ring)
            if watch is None or watch is not known:
                continue
            avail, used = queue.avail_idx(), queue.used_idx
            if avail == watch.avail and avail != queue.avail_seen:
                self.faults.rescued["kicks"] += 1
                log.warning("queue %d: available entries without a kick for over %.0f ms; "
                            "served (a lost notification)", ring.index, PERIOD * 1000)
                session.service(ring)
                used = queue.used_idx if ring.queue is queue else used
            elif (used == watch.used and used != watch.signalled and ring.call is not None
                  and _driver_wants_call(queue, watch.signalled)):
                self.faults.rescued["calls"] += 1
                log.info("queue %d: used entries without a call for over %.0f ms; signalled",
                         ring.index, PERIOD * 1000)
                ring.call.signal()
                session.stats.queue(ring.index).notifications += 1
                watch.signalled = used
            watch.avail, watch.used = avail, used


def _driver_wants_call(queue: SplitQueue, signalled: int) -> bool:
    """Whether the driver asked for an interrupt for the entries used since
    ``signalled`` (virtio 1.2 2.7.10: the NO_INTERRUPT flag, or ``used_event``
    with VIRTIO_F_EVENT_IDX)."""
    if queue.event_idx:
        return vring_need_event(queue.used_event(), queue.used_idx, signalled)
    return not queue.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
