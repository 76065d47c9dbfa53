"""One receive/transmit queue pair: its state and the watch on its link fd.

Owns which of the pair's rings are being served, whether reception waits
for the driver (no buffers: the link fd is not watched until the next RX
kick, so a busy link cannot spin the loop and nothing queues up here) and
whether transmission waits for the link (full: the fd is watched for
writability).  :meth:`QueuePair.sync` turns that state into exactly the
daemon registrations it calls for, so no path can forget to unwatch.
Moving frames is :mod:`.rx`'s and :mod:`.tx`'s.
"""

from __future__ import annotations

import selectors
from dataclasses import dataclass

from dvmm_shared.vhost_user.backend import BackendHost

from .header import HDR_LEN
from .link import Link
from .stats import NetStats, PairStats

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


@dataclass
class NetConfig:
    """What the negotiated features mean for the data path."""

    features: int = 0
    hdr_len: int = HDR_LEN
    mrg_rxbuf: bool = False
    guest_csum: bool = False
    #: Buffer bytes a received frame may need, header included: with
    #: MRG_RXBUF reception waits until that much is posted.
    rx_need: int = 0


class QueuePair:
    """Receive queue ``2*index``, transmit queue ``2*index+1`` (5.1.2)."""

    def __init__(self, index: int, link: Link, cfg: NetConfig, stats: NetStats) -> None:
        self.index = index
        self.rx_queue = 2 * index
        self.tx_queue = 2 * index + 1
        self.link = link
        self.cfg = cfg
        self.all_stats = stats
        self.host: BackendHost | None = None
        self.rx_running = False
        self.tx_running = False
        self.active = True  # within the driver's VQ_PAIRS_SET
        self.rx_paused = False  # waiting for an RX kick (no buffers, link error)
        # The last round read the link dry: until the fd is readable again,
        # a kick (the driver posting buffers) has nothing to receive, and the
        # watch on the fd (level-triggered) reports the next frame anyway.
        self.rx_drained = False
        self.tx_blocked = False  # waiting for the link to take frames again
        self._fd = -1
        self._events = 0

    @property
    def stats(self) -> PairStats:
        return self.all_stats.pairs[self.index]

    @property
    def rx_on(self) -> bool:
        return self.rx_running and self.active

    @property
    def watching(self) -> int:
        """The selector events currently registered for the link fd."""
        return self._events

    # -- lifecycle ----------------------------------------------------------------
    def attach(self, host: BackendHost) -> None:
        self.host = host
        self.reset()

    def reset(self) -> None:
        self.rx_running = self.tx_running = False
        self.rx_paused = self.tx_blocked = self.rx_drained = False
        self.active = True
        self._fd, self._events = -1, 0

    def queue_started(self, queue: int) -> None:
        if queue == self.rx_queue:
            self.rx_running, self.rx_paused, self.rx_drained = True, False, False
        else:
            self.tx_running, self.tx_blocked = True, False
        self._apply()

    def queue_stopped(self, queue: int) -> None:
        if queue == self.rx_queue:
            self.rx_running = False
        else:
            self.tx_running = self.tx_blocked = False
        self._apply()

    def set_active(self, active: bool) -> None:
        self.active = active
        self._apply()

    def _apply(self) -> None:
        # A detached TAP queue polls as an error: unwatch before detaching,
        # attach before watching.
        if self.rx_on:
            self.link.set_pair_active(self.index, True)
            self.sync()
        else:
            self.sync()
            self.link.set_pair_active(self.index, False)

    # -- the paths report ---------------------------------------------------------
    def pause_rx(self) -> None:
        """No buffers (or the link failed): stop reading until the next RX kick."""
        self.rx_paused = True
        self.sync()

    def resume_rx(self) -> None:
        if self.rx_paused:
            self.rx_paused = False
            self.sync()

    def block_tx(self) -> None:
        self.tx_blocked = True
        self.all_stats.tx_blocked += 1
        self.sync()

    def relink(self) -> None:
        """The link's fd changes (a peer came or went): re-register on the new one."""
        if self.host is not None and self._fd >= 0:
            self.host.unwatch(self._fd)
        self._fd, self._events = -1, 0
        self.link.reopen(self.index)
        self.tx_blocked = self.rx_drained = False
        self.sync()

    # -- registrations ------------------------------------------------------------
    def sync(self) -> None:
        """Register exactly what the state calls for (read, write, or nothing)."""
        host = self.host
        if host is None:
            return
        want = 0
        if self.rx_on and not self.rx_paused:
            want |= READ
        if self.tx_running and self.tx_blocked:
            want |= WRITE
        fd = self.link.fileno(self.index) if want else -1
        if fd < 0:
            want = 0
        if (fd, want) == (self._fd, self._events):
            return
        if self._fd >= 0:
            host.unwatch(self._fd)
        self._fd, self._events = fd, want
        if want & READ:
            host.watch(fd, READ, self._on_readable)
        if want & WRITE:
            host.watch(fd, WRITE, self._on_writable)

    def _on_readable(self) -> None:
        self.rx_drained = False
        if self.host is not None:
            self.host.service_queue(self.rx_queue)

    def _on_writable(self) -> None:
        self.tx_blocked = False
        self.sync()
        if self.host is not None:
            self.host.service_queue(self.tx_queue)
