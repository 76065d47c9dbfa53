"""One vring as the backend holds it, and the default request/response loop.

Owns the per-ring protocol state (:class:`Vring`: size, addresses, base,
kick/call/err eventfds, started/enabled/broken, the mapped queue and its
in-flight region), the fault-injection knobs shared by the daemon and its
sessions (:class:`Faults`), and :func:`serve_chains`, the hot loop that
hands every available chain to the device's ``handle_chain`` and returns it
used.  A device that completes chains later, out of order, takes them with
:func:`start_chains` and returns them with :func:`publish_completions`: one
put per chain, each with the in-flight steps of vhost-user.rst "Inflight I/O
tracking" (``last_batch_head``, used element, used index, entry retired), so
a batch of completions is a run of one-entry batches.  That keeps recovery
exact with the one ``last_batch_head`` entry that libvhost-user (and
:meth:`~dvmm_shared.inflight.InflightQueue.recover`) clear, and the region
interchangeable with libvhost-user backends; the driver is still signalled
once per batch.  Messages are :mod:`.session`'s; the event loop is
:mod:`.daemon`'s.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from ..eventfd import EventFd
from ..inflight import InflightQueue
from ..virtqueue import ChainError, SplitQueue
from .backend import QueueStats, StartChain, VhostUserBackend
from .channel import ChannelFaults, Notifications
from .message import VringAddr

log = logging.getLogger("dvmm.vhost_user")

#: Where :attr:`Faults.crash_point` may stop the process while a request is
#: handled by :func:`serve_chains`: taken from the ring and marked in flight;
#: served by the device (data written); used element written, used index not
#: yet published; used index published, in-flight entry not yet retired.
CRASH_POINTS = ("after-pop", "after-data", "before-used", "after-used")


class RequestFailed(Exception):
    """A well-formed request that cannot be honoured (reported to the frontend)."""


class RingState(Enum):
    STOPPED = "stopped"
    STARTED = "started"
    BROKEN = "broken"


@dataclass
class Faults:
    """Fault injection, set by whoever controls the daemon; read on the loop.

    ``crash_point`` (one of :data:`CRASH_POINTS`) makes the serve loop
    SIGKILL its own process at that step of the next request;
    ``service_delay`` (seconds) is slept before each ring service pass;
    ``channel`` drops or delays kicks and calls."""

    crash_point: str | None = None
    service_delay: float = 0.0
    #: Kick and call faults, delayed notifications and the lost-notification
    #: safety net (:mod:`.channel`).
    channel: Notifications = field(default_factory=lambda: Notifications(ChannelFaults()))


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
    inflight: InflightQueue | None = None
    #: Signal the call eventfd at the next service (a restarted backend).
    resignal: bool = False

    @property
    def running(self) -> bool:
        """Started and enabled: the device may serve it."""
        return self.state is RingState.STARTED and self.enabled

    def close_fds(self) -> None:
        for efd in (self.kick, self.call, self.err):
            if efd is not None:
                efd.close()
        self.kick = self.call = self.err = None


def serve_chains(backend: VhostUserBackend, index: int, queue: SplitQueue, st: QueueStats,
                 crash_point: str | None = None) -> bool:
    """Every available chain to ``handle_chain``, then used; whether any was pushed.

    Chains left in flight by a previous process come first (the queue hands
    them out again); a bad chain is returned at once with 0 bytes written."""
    return start_chains(index, queue, st, backend.handle_chain, crash_point)


def start_chains(index: int, queue: SplitQueue, st: QueueStats, start: StartChain,
                 crash_point: str | None = None) -> bool:
    """Every available chain to ``start``, which serves it now (returns the
    bytes written: pushed here) or takes it (returns None: the device
    completes it later with :func:`publish_completions`); whether any was pushed.

    Each chain is marked in flight when popped, before ``start`` sees it.
    The caller notifies the driver once the pass is over (notifying after
    each push, as soon as the driver wants it, was measured: 25-45 % fewer
    IOPS, the extra wake-ups cost more than the overlap gains)."""
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
        if crash_point == "after-pop":
            crash_process("after-pop")
        written = start(index, chain)
        if written is not None:
            if crash_point is None:
                queue.push(chain.head, written)
            else:
                _put_crashing(queue, chain.head, written, crash_point)
            st.requests += 1
            pushed = True


def publish_completions(queue: SplitQueue, done: Sequence[tuple[int, int]], st: QueueStats,
                        crash_point: str | None = None) -> None:
    """Put ``(head, written)`` pairs in the used ring, in order, one at a time
    (see the module docstring); the caller decides about the notification."""
    if crash_point is None:
        push = queue.push
        for head, written in done:
            push(head, written)
    else:
        for head, written in done:
            _put_crashing(queue, head, written, crash_point)
    st.requests += len(done)


def _put_crashing(queue: SplitQueue, head: int, written: int, point: str) -> None:
    """One put, step by step, dying at ``point`` (the request's data is done)."""
    _crash_if(point, "after-data")
    queue.write_used(head, written)
    _crash_if(point, "before-used")
    queue.publish_used()
    _crash_if(point, "after-used")
    queue.retire(head)


def _crash_if(point: str, here: str) -> None:
    if point == here:
        crash_process(here)


def crash_process(where: str) -> None:
    """SIGKILL this process, as a crash would (tests replace this function)."""
    log.warning("fault injection: crashing %s", where)
    os.kill(os.getpid(), signal.SIGKILL)
