"""Transmit: each chain the driver posts goes to the link in one ``writev``.

Owns serving a transmit ring.  A chain is checked (device-readable only,
a header the negotiated features allow, 5.1.6.2) and written straight from
guest memory: with the header to a TAP opened with ``IFF_VNET_HDR`` (the
kernel then checksums and segments), without it to a link of bare frames.
Every chain is returned with a used length of 0 (the device writes nothing
into transmit buffers).

After a backend crash, chains the previous process had taken and not
returned (in-flight tracking, :mod:`dvmm_shared.inflight`) are handed out
first by the queue and simply sent again: a frame may reach the link twice,
which a network tolerates as it tolerates loss.

A full link (BlockingIOError) gives the chain back to the ring and waits
for the link fd to be writable, instead of dropping or queueing.  A bad
chain or a link error drops that frame, counted, and the ring keeps going.
"""

from __future__ import annotations

import logging

from dvmm_shared.virtqueue import ChainError, DescriptorChain, SplitQueue

from .header import NetHeaderError, TxFrame, split_tx_chain
from .link import LinkDown
from .pair import QueuePair
from .stats import worth_logging

log = logging.getLogger("dvmm.net")


def transmit(pair: QueuePair, queue: SplitQueue) -> bool:
    """Serve a transmit ring; whether anything was pushed."""
    if pair.tx_blocked or not pair.tx_running:
        return False
    pushed = False
    while True:
        try:
            chain = queue.pop()
        except ChainError as exc:
            pair.all_stats.tx_bad_chains += 1
            if worth_logging(pair.all_stats.tx_bad_chains):
                log.warning("pair %d: %s; dropped", pair.index, exc)
            queue.push(exc.head, 0)
            pushed = True
            continue
        if chain is None:
            return pushed
        if not _send(pair, chain):
            queue.undo_pop(chain.head)
            pair.block_tx()
            return pushed
        queue.push(chain.head, 0)
        pushed = True


def _send(pair: QueuePair, chain: DescriptorChain) -> bool:
    """Send one chain's frame (or drop it, counted); False if the link is full."""
    cfg, stats = pair.cfg, pair.all_stats
    try:
        frame = split_tx_chain(chain.readable, chain.writable, cfg.hdr_len, cfg.features)
    except NetHeaderError as exc:
        stats.tx_bad_chains += 1
        if worth_logging(stats.tx_bad_chains):
            log.warning("pair %d: chain %d: %s; dropped", pair.index, chain.head, exc)
        return True
    link = pair.link
    if not link.vnet_hdr and not frame.hdr.is_plain:
        # Offloads are never offered on such a link; a driver asking anyway is broken.
        stats.tx_bad_chains += 1
        return True
    try:
        link.send(pair.index, frame.hdr_bufs + frame.data if link.vnet_hdr else frame.data)
    except BlockingIOError:
        return False
    except LinkDown:
        stats.tx_link_down += 1
        return True
    except OSError as exc:
        stats.tx_link_errors += 1
        if worth_logging(stats.tx_link_errors):
            log.warning("pair %d: send failed, frame dropped: %s", pair.index, exc)
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
