"""The virtio-net device: features, config space, the control queue, and
which ring goes to which path.

Owns what the device advertises (virtio 1.2 section 5.1: feature bits and
``struct virtio_net_config``), what the acknowledged features mean for the
link (header size, TAP offloads), the virtqueue layout (5.1.2: receiveq
``2k``, transmitq ``2k+1``, the control queue last, or at 2 when MQ is not
negotiated) and the control commands.  Frames are moved by :mod:`.rx` and
:mod:`.tx`, per queue pair (:mod:`.pair`); the link is any :class:`Link`.

With QEMU as the frontend, QEMU's virtio-net model keeps the config space
and the control queue for itself and only hands the data rings over; the
dvmm core exposes all of them, so both halves are here.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from dvmm_shared.chain import ChainReader, ChainWriter
from dvmm_shared.vhost_user.backend import BackendHost, VhostUserBackend
from dvmm_shared.virtio import (
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
    bit,
)
from dvmm_shared.virtqueue import DescriptorChain, SplitQueue

from .header import MAX_GSO_FRAME, header_size, max_frame
from .link import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Link
from .pair import NetConfig, QueuePair
from .request import (
    CtrlCommand,
    CtrlDataError,
    CtrlError,
    CtrlUnknownError,
    MacTableSet,
    MqPairsSet,
    NoAckByteError,
    RxMode,
    read_command,
    take_ack,
)
from .rx import receive
from .stats import NetStats
from .tx import transmit

log = logging.getLogger("dvmm.net")

# struct virtio_net_config up to mtu (5.1.4): mac, status, max_virtqueue_pairs, mtu.
CONFIG = struct.Struct("<6sHHH")
DEFAULT_MTU = 1500
MIN_MTU, MAX_MTU = 68, 65535

FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "CSUM", VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_MTU: "MTU", VIRTIO_NET_F_MAC: "MAC",
    VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4", VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4", VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF", VIRTIO_NET_F_STATUS: "STATUS",
    VIRTIO_NET_F_CTRL_VQ: "CTRL_VQ", VIRTIO_NET_F_CTRL_RX: "CTRL_RX",
    VIRTIO_NET_F_MQ: "MQ", VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_F_RING_INDIRECT_DESC: "INDIRECT_DESC", VIRTIO_F_RING_EVENT_IDX: "EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
}
_OFFLOADS = ((VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4, "TSO4"),
             (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6, "TSO6"))


def feature_names(features: int) -> list[str]:
    return [name for b, name in sorted(FEATURE_NAMES.items()) if features & bit(b)]


def tap_offloads(features: int) -> int:
    """TUNSETOFFLOAD bits for what the driver accepts: partial checksums with
    GUEST_CSUM, and unsegmented TCP (which needs them) with GUEST_TSO4/6."""
    if not features & bit(VIRTIO_NET_F_GUEST_CSUM):
        return 0
    out = TUN_F_CSUM
    for feature, flag, _ in _OFFLOADS:
        if features & bit(feature):
            out |= flag
    return out


def offload_names(offloads: int) -> str:
    names = [n for f, n in ((TUN_F_CSUM, "CSUM"), (TUN_F_TSO4, "TSO4"), (TUN_F_TSO6, "TSO6"))
             if offloads & f]
    return " ".join(names) or "none"


class NetDevice(VhostUserBackend):
    """A virtio-net device on one :class:`Link`."""

    max_queue_size = 1024

    def __init__(self, link: Link, *, mac: bytes, mtu: int | None = None,
                 queue_pairs: int = 1, config_space: bool = True) -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        if not 1 <= queue_pairs <= link.pairs:
            raise ValueError(f"{queue_pairs} queue pairs on a link of {link.pairs}")
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        self.link = link
        self.config_space = config_space
        self.mac = bytes(mac)
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.cfg = NetConfig()
        self._stats = NetStats.for_pairs(queue_pairs)
        self.pairs = [QueuePair(i, link, self.cfg, self._stats) for i in range(queue_pairs)]
        self.rx_mode: dict[int, bool] = {}
        self.mac_filters = 0
        self._usable_pairs = 1
        self._ctrl_index: int | None = None
        self._configure(0)

    # -- what the device offers -----------------------------------------------------
    @property
    def num_queues(self) -> int:
        return 2 * self.queue_pairs + 1

    def features(self) -> int:
        f = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX)
             | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_ANY_LAYOUT)
             | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF)
             | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX))
        if self.mtu is not None:
            f |= bit(VIRTIO_NET_F_MTU)
        if self.queue_pairs > 1:
            f |= bit(VIRTIO_NET_F_MQ)
        if self.link.vnet_hdr:  # offloads need the header to reach the kernel
            for b in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4,
                      VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6):
                f |= bit(b)
        return f

    def config(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, self.queue_pairs,
                           self.mtu if self.mtu is not None else DEFAULT_MTU)

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config()[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        log.info("ignoring a write of %d bytes to config offset %d (read-only in virtio 1.x)",
                 len(data), offset)

    def set_features(self, features: int) -> None:
        self._configure(features)
        log.info("driver acked features %#x: %s", features, " ".join(feature_names(features)))
        log.info("%s: vnet header %d bytes, offloads %s", self.link.description,
                 self.cfg.hdr_len, offload_names(tap_offloads(features))
                 if self.link.vnet_hdr else "none (bare frames)")

    def _configure(self, features: int) -> None:
        cfg = self.cfg
        cfg.features = features
        cfg.hdr_len = header_size(features)
        cfg.mrg_rxbuf = bool(features & bit(VIRTIO_NET_F_MRG_RXBUF))
        cfg.guest_csum = bool(features & bit(VIRTIO_NET_F_GUEST_CSUM))
        gso = features & (bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6))
        frame = MAX_GSO_FRAME if gso else max_frame(max(self.mtu or DEFAULT_MTU, DEFAULT_MTU))
        cfg.rx_need = cfg.hdr_len + frame
        mq = bool(features & bit(VIRTIO_NET_F_MQ))
        self._usable_pairs = self.queue_pairs if mq else 1
        has_ctrl = bool(features & bit(VIRTIO_NET_F_CTRL_VQ))
        self._ctrl_index = (2 * self._usable_pairs if mq else 2) if has_ctrl else None
        self.link.set_vnet_header(cfg.hdr_len, tap_offloads(features))
        # Every pair the features allow is in use until VQ_PAIRS_SET says
        # otherwise (QEMU keeps that command and enables rings instead).  A
        # multi-queue TAP keeps only queues a running ring drains attached.
        for pair in self.pairs:
            pair.set_active(pair.index < self._usable_pairs)

    # -- rings --------------------------------------------------------------------
    def _pair_of(self, queue_index: int) -> QueuePair | None:
        if queue_index == self._ctrl_index:
            return None
        index = queue_index // 2
        return self.pairs[index] if index < self._usable_pairs else None

    def attach(self, host: BackendHost) -> None:
        for pair in self.pairs:
            pair.attach(host)

    def queue_started(self, index: int) -> None:
        pair = self._pair_of(index)
        if pair is not None:
            pair.queue_started(index)

    def queue_stopped(self, index: int) -> None:
        pair = self._pair_of(index)
        if pair is not None:
            pair.queue_stopped(index)

    def process_queue(self, queue_index: int, queue: SplitQueue,
                      serve: Callable[[int, SplitQueue], bool]) -> bool:
        if queue_index == self._ctrl_index:
            return serve(queue_index, queue)
        pair = self._pair_of(queue_index)
        if pair is None:
            return False  # a queue the negotiated features do not have
        if queue_index == pair.rx_queue:
            return receive(pair, queue)
        return transmit(pair, queue)

    # -- control queue (5.1.6.5) --------------------------------------------------
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        writer = ChainWriter(chain.writable)
        try:
            ack = take_ack(writer)
        except NoAckByteError as exc:
            self._stats.ctrl_err += 1
            log.warning("control queue: %s; command dropped", exc)
            return 0
        try:
            self._control(read_command(ChainReader(chain.readable)))
        except CtrlError as exc:
            self._stats.ctrl_err += 1
            log.info("control command refused: %s", exc)
            ack[0] = VIRTIO_NET_ERR
        else:
            self._stats.ctrl_ok += 1
            ack[0] = VIRTIO_NET_OK
        return 1

    def _control(self, cmd: CtrlCommand) -> None:
        features = self.cfg.features
        if isinstance(cmd, RxMode | MacTableSet):
            if not features & bit(VIRTIO_NET_F_CTRL_RX):
                raise CtrlUnknownError("RX mode commands without VIRTIO_NET_F_CTRL_RX")
            # Every frame is delivered (the guest filters too): the modes are
            # acknowledged and remembered, not enforced.
            if isinstance(cmd, RxMode):
                self.rx_mode[cmd.command] = cmd.on
            else:
                self.mac_filters = len(cmd.unicast) + len(cmd.multicast)
            return
        if isinstance(cmd, MqPairsSet):
            if not features & bit(VIRTIO_NET_F_MQ):
                raise CtrlUnknownError("VQ_PAIRS_SET without VIRTIO_NET_F_MQ")
            limit = min(self.queue_pairs, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX)
            if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= cmd.pairs <= limit:
                raise CtrlDataError(f"VQ_PAIRS_SET {cmd.pairs}, the device has {limit}")
            for pair in self.pairs:
                pair.set_active(pair.index < cmd.pairs)
            log.info("driver uses %d queue pair%s", cmd.pairs, "s" if cmd.pairs > 1 else "")
            return
        raise CtrlUnknownError(f"{type(cmd).__name__} was not offered")

    # -- lifecycle ------------------------------------------------------------------
    def stats(self) -> NetStats:
        return self._stats

    def reset(self) -> None:
        if any(p.rx_frames or p.tx_frames for p in self._stats.pairs):
            log.info("frontend gone; so far: %s", self._stats.summary())
        for pair in self.pairs:
            pair.reset()
        self.rx_mode.clear()
        self._configure(0)

    def close(self) -> None:
        self.link.close()
