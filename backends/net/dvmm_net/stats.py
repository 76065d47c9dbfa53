"""Counters of the net device: traffic per queue pair, drops by reason.

Every frame the device does not deliver is counted under the reason it
was dropped, so a hostile or broken guest shows up in the backend's log
(printed on exit) and in :meth:`NetDevice.stats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PairStats:
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_gso: int = 0  # frames the TAP handed over unsegmented (GUEST_TSO)
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_gso: int = 0  # frames the guest sent unsegmented (HOST_TSO)
    tx_csum: int = 0  # frames whose checksum the guest left to the host


@dataclass
class NetStats:
    pairs: list[PairStats] = field(default_factory=list)
    rx_truncated: int = 0  # frame longer than the buffers posted for it
    rx_bad_chains: int = 0  # malformed or wrong-direction receive chains
    rx_link_errors: int = 0
    rx_starved: int = 0  # times reception paused for lack of buffers
    tx_bad_chains: int = 0  # malformed chains, wrong direction, bad headers
    tx_link_errors: int = 0
    tx_link_down: int = 0  # nobody at the other end of a peer link
    tx_blocked: int = 0  # times the link was full and transmission waited
    ctrl_ok: int = 0
    ctrl_err: int = 0

    @classmethod
    def for_pairs(cls, n: int) -> NetStats:
        return cls(pairs=[PairStats() for _ in range(n)])

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """One line: per-pair traffic, then every non-zero drop counter."""
        parts = [f"pair{i}: rx {p.rx_frames} frames/{p.rx_bytes} B ({p.rx_gso} gso), "
                 f"tx {p.tx_frames} frames/{p.tx_bytes} B ({p.tx_gso} gso, "
                 f"{p.tx_csum} csum)" for i, p in enumerate(self.pairs)]
        counters = {k: v for k, v in asdict(self).items() if k != "pairs" and v}
        parts.append(" ".join(f"{k}={v}" for k, v in counters.items()) or "no drops")
        return "; ".join(parts)


def worth_logging(count: int) -> bool:
    """Log the first drops of a kind, then only every power of two: a guest
    sending garbage in a loop must not flood the log (the counters say all)."""
    return count <= 10 or count & (count - 1) == 0
