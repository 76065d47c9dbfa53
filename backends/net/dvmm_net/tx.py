"""Transmit: each chain the driver posts goes to the link in one ``writev``.

Owns serving a transmit ring.  A chain is checked (device-readable only,
a header the negotiated features allow, 5.1.6.2) and written straight from
guest memory: with the header to a TAP opened with ``IFF_VNET_HDR`` (the
kernel then checksums and segments), without it to a link of bare frames.
Every chain is returned with a used length of 0 (the device writes nothing
into transmit buffers).

Chains are taken in bursts of :data:`TX_BURST` (:meth:`SplitQueue.pop_batch`)
and each burst is returned before the next is taken, through the host's
``complete`` (one used entry and in-flight retirement at a time, the driver
signalled once per burst if it asks): the driver reclaims and refills
while the device sends, instead of the two taking turns over a whole ring
(measured: the bench's TX rate roughly doubled).  The common chain, one
descriptor holding a header that asks for no offload (flags and gso_type
0: 5.1.6.2.1 then imposes nothing on the other fields) and at least an
Ethernet header, goes to the link without being parsed; anything else takes
the general path (:func:`split_tx_chain`).  A TAP takes one frame per
``write``: it has no ``sendmmsg``, so one system call per frame is the floor
here.  io_uring could put a burst of writes in one call and save the
system-call round trip of each (about 0.9 us from Python on these machines,
of the ~4.5 us a frame costs the backend), less the cost of preparing each
entry from Python; but no maintained binding works here (the ``liburing``
wheel executes AVX-512 instructions these CPUs lack; ``pyuring`` does not
build against Debian 12's liburing 2.3, and submits each operation with its
own ``io_uring_submit``).  The kernel's work per frame stays either way.

After a backend crash, chains the previous process had taken and not
returned (in-flight tracking, :mod:`dvmm_shared.inflight`) are handed out
first by the queue and simply sent again: a frame may reach the link twice,
which a network tolerates as it tolerates loss.  Pushed chains leave the
region one by one as their used entry is published.

A full link (BlockingIOError) gives the chain, and every later one of the
burst, back to the ring (newest first) and waits for the link fd to be
writable, instead of dropping or queueing.  A bad chain or a link error
drops that frame, counted, and the ring keeps going.
"""

from __future__ import annotations

import logging

from dvmm_shared.virtqueue import ChainError, DescriptorChain, SplitQueue

from .header import ETH_HLEN, NetHeaderError, TxFrame, split_tx_chain
from .link import LinkDown
from .pair import QueuePair
from .stats import worth_logging

log = logging.getLogger("dvmm.net")

#: Chains taken per burst.  Each burst's chains are returned (and the
#: driver signalled, if it asks) before the next is taken, so a driver
#: refills the ring while the device is still sending: device and driver
#: overlap instead of taking turns over a whole ring.
TX_BURST = 32


def transmit(pair: QueuePair, queue: SplitQueue) -> bool:
    """Serve a transmit ring until it is empty; whether anything was pushed
    that the caller must still signal."""
    if pair.tx_blocked or not pair.tx_running:
        return False
    unsignalled = False
    while True:
        batch = queue.pop_batch(TX_BURST)
        if not batch:
            return unsignalled
        used, sent = _send_batch(pair, batch)
        if used:
            unsignalled |= _publish(pair, queue, used)
        if sent < len(batch):  # the link is full: the rest goes back, newest first
            for chain in reversed(batch[sent:]):
                queue.undo_pop(chain.head)
            pair.block_tx()
            return unsignalled


def _publish(pair: QueuePair, queue: SplitQueue, used: list[tuple[int, int]]) -> bool:
    """Return a burst's chains now, signalling the driver if it asks (the
    host's ``complete``), so it can refill the ring while the next burst is
    sent; True if they were only pushed (no host: the caller signals)."""
    if pair.host is None:
        queue.push_batch(used)
        return True
    pair.host.complete(pair.tx_queue, used)
    return False


def _send_batch(pair: QueuePair, batch: list[DescriptorChain | ChainError]
                ) -> tuple[list[tuple[int, int]], int]:
    """Send a burst; its used entries, and how many chains were dealt with
    (fewer than the burst when the link filled up)."""
    link, index, hdr_len = pair.link, pair.index, pair.cfg.hdr_len
    send, whole = link.send, link.vnet_hdr
    shortest = hdr_len + ETH_HLEN
    used: list[tuple[int, int]] = []
    frames = nbytes = 0
    sent = len(batch)
    for i, chain in enumerate(batch):
        if isinstance(chain, ChainError):
            _bad_chain(pair, str(chain))
        else:
            bufs = chain.readable
            buf = bufs[0] if len(bufs) == 1 and not chain.writable else None
            if buf is not None and len(buf) >= shortest and not buf[0] and not buf[1]:
                try:  # the common chain: a plain header and the frame, one buffer
                    send(index, bufs if whole else [buf[hdr_len:]])
                except BlockingIOError:
                    sent = i
                    break
                except (OSError, LinkDown) as exc:
                    _link_failed(pair, exc)
                else:
                    frames += 1
                    nbytes += len(buf) - hdr_len
            elif not _send(pair, chain):
                sent = i
                break
        used.append((chain.head, 0))
    st = pair.stats
    st.tx_frames += frames
    st.tx_bytes += nbytes
    return used, sent


def _bad_chain(pair: QueuePair, why: str) -> None:
    stats = pair.all_stats
    stats.tx_bad_chains += 1
    if worth_logging(stats.tx_bad_chains):
        log.warning("pair %d: %s; dropped", pair.index, why)


def _link_failed(pair: QueuePair, exc: OSError | LinkDown) -> None:
    """A frame the link refused (not for being full): dropped, counted."""
    stats = pair.all_stats
    if isinstance(exc, LinkDown):
        stats.tx_link_down += 1
        return
    stats.tx_link_errors += 1
    if worth_logging(stats.tx_link_errors):
        log.warning("pair %d: send failed, frame dropped: %s", pair.index, exc)


def _send(pair: QueuePair, chain: DescriptorChain) -> bool:
    """Send one chain's frame the general way (or drop it, counted); False
    if the link is full."""
    cfg = pair.cfg
    try:
        frame = split_tx_chain(chain.readable, chain.writable, cfg.hdr_len, cfg.features)
    except NetHeaderError as exc:
        _bad_chain(pair, f"chain {chain.head}: {exc}")
        return True
    link = pair.link
    if not link.vnet_hdr and not frame.hdr.is_plain:
        # Offloads are never offered on such a link; a driver asking anyway is broken.
        pair.all_stats.tx_bad_chains += 1
        return True
    try:
        link.send(pair.index, frame.hdr_bufs + frame.data if link.vnet_hdr else frame.data)
    except BlockingIOError:
        return False
    except (OSError, LinkDown) as exc:
        _link_failed(pair, exc)
        return True
    _count(pair, frame)
    return True


def _count(pair: QueuePair, frame: TxFrame) -> None:
    st = pair.stats
    st.tx_frames += 1
    st.tx_bytes += frame.data_len
    if frame.hdr.gso:
        st.tx_gso += 1
    if frame.hdr.needs_csum:
        st.tx_csum += 1
