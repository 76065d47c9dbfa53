"""The small interface a device implements to become a vhost-user backend.

A device says what it offers (queues, virtio features, config space) and
turns one descriptor chain into the number of bytes it wrote.  It never
parses vhost-user messages or walks rings: :mod:`.daemon` does that and
calls these methods.  Request/response devices (blk) only implement
``handle_chain``; devices driven by other events (net RX) override
``process_queue`` and use the :class:`BackendHost` handed to ``attach``:
it watches extra fds (a TAP) with callbacks and services a queue on demand,
and ``queue_started``/``queue_stopped`` say when a ring may be served.

A device that completes requests later, out of order (blk's I/O engines),
takes chains with :meth:`BackendHost.submit_chains` and hands them back with
:meth:`BackendHost.complete` on the loop thread, woken by an fd it watches;
it must have completed every chain of a ring when ``queue_stopped`` returns
(the ring's position is read back next).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..virtqueue import DescriptorChain, SplitQueue

if TYPE_CHECKING:
    from .connection import Message


@dataclass
class QueueStats:
    """Counters per queue, reported by the backend's stats."""

    requests: int = 0
    bad_chains: int = 0
    notifications: int = 0
    kicks: int = 0
    resubmitted: int = 0  # requests a previous process left in flight, served again


@dataclass
class BackendStats:
    queues: dict[int, QueueStats] = field(default_factory=dict)
    protocol_errors: int = 0
    connections: int = 0

    def queue(self, index: int) -> QueueStats:
        return self.queues.setdefault(index, QueueStats())


#: A device's start of one request: the bytes written (served now, pushed at
#: once) or None (taken: it comes back later through BackendHost.complete).
StartChain = Callable[[int, DescriptorChain], int | None]


class BackendHost(Protocol):
    """What the daemon lends a backend for one frontend connection.

    Callbacks run on the daemon's loop, like everything else, so they need
    no locks.  ``events`` is ``selectors.EVENT_READ`` or ``EVENT_WRITE``; an fd
    can be watched for both with two calls.  Watches end with ``unwatch`` or
    with the connection (after ``queue_stopped`` for every running ring)."""

    def watch(self, fd: int, events: int, callback: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int, events: int = ...) -> None: ...
    def service_queue(self, index: int) -> None:
        """Run the queue now, as a kick would (a no-op unless it is running)."""
    def submit_chains(self, index: int, queue: SplitQueue, start: StartChain) -> bool:
        """Every available chain to ``start`` (a bad chain is returned at once
        with 0 bytes); whether anything was pushed.  For ``process_queue``."""
    def complete(self, index: int, done: Sequence[tuple[int, int]]) -> None:
        """Publish ``(head, bytes written)`` of chains taken earlier, in this
        order, then signal the call eventfd once if the driver wants it."""
    def config_changed(self) -> bool:
        """Tell the frontend the config space changed (BACKEND_CONFIG_CHANGE_MSG
        on the back-end channel); False when there is no such channel (a
        backend offers it by adding ProtocolFeature.BACKEND_REQ to
        ``protocol_features``)."""


class VhostUserBackend(ABC):
    """What one device backend provides."""

    #: Largest ring the device accepts (SET_VRING_NUM above it is refused).
    max_queue_size: int = 1024

    #: Offer VHOST_USER_PROTOCOL_F_CONFIG (the frontend reads the config space
    #: from the backend).  QEMU 7.2's vhost-user-net crashes when offered it.
    config_space: bool = True

    @property
    @abstractmethod
    def num_queues(self) -> int:
        """How many virtqueues the device has (GET_QUEUE_NUM)."""

    @abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered (VERSION_1 etc.; not PROTOCOL_FEATURES)."""

    def protocol_features(self) -> int:
        """Device-specific protocol feature bits in addition to the daemon's own."""
        return 0

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The features the driver acknowledged."""

    #: Bytes of device state kept in the in-flight memfd after the queues'
    #: region (0: none).  The frontend keeps that memfd across backend
    #: restarts (INFLIGHT_SHMFD), so what a device writes there survives it.
    state_size: int = 0

    def state_region(self, fd: int, offset: int, fresh: bool) -> None:  # noqa: B027
        """The in-flight memfd arrived: ``state_size`` bytes at ``offset`` are
        the device's (map them before returning; the fd is closed after).
        ``fresh``: a new region (GET_INFLIGHT_FD), or one handed back on
        which no ring has run since the frontend cleared it (a new driver
        session); otherwise what the previous process left there."""

    def extra_requests(self) -> Mapping[int, Callable[[Message], None]]:
        """Device-specific front-end requests this backend serves (e.g.
        GPU_SET_SOCKET), by request number; each handler takes the fds it
        keeps (``msg.take_fd()``) and raises an exception the session
        reports as a failed request (OSError, ValueError)."""
        return {}

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device config space from ``offset`` (zero padded)."""
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional hook
        """A driver write to the device config space."""

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; return the number of bytes written into the chain."""
        raise NotImplementedError(f"{type(self).__name__} does not handle chains")

    def process_queue(self, queue_index: int, queue: SplitQueue,
                      serve: Callable[[int, SplitQueue], bool]) -> bool:
        """Drain a kicked queue.  The default hands every chain to ``handle_chain``
        through the daemon's ``serve`` helper; returns whether anything was pushed."""
        return serve(queue_index, queue)

    def attach(self, host: BackendHost) -> None:  # noqa: B027 - optional hook
        """A frontend connected; ``host`` serves until the next ``attach``."""

    def queue_started(self, index: int) -> None:  # noqa: B027 - optional hook
        """Ring ``index`` is started and enabled: it may be served from now on."""

    def queue_stopped(self, index: int) -> None:  # noqa: B027 - optional hook
        """Ring ``index`` is no longer served (stopped, disabled, broken or the
        frontend left); called before its position is read back."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The frontend went away or reset the device: forget per-connection state."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """The daemon is exiting: release files and fds."""
