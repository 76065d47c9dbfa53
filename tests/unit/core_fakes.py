"""Recording fakes of what the core's device models talk to.

A vhost-user link, the interrupt router, the VM (ioeventfd, irqfd, GSI
routing, IRQ lines) and the INTx pump, each recording the calls made to it
so a test can check what a guest access caused.  The virtio-pci transport
and the IRQ router run real against these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dvmm_core.vhost_user_frontend import LinkDown, QueueStart
from dvmm_shared.virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, bit

FAKE_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(9) | bit(2)
FAKE_CONFIG = bytes(range(60))


@dataclass
class FakeLink:
    """Stands in for :class:`VhostUserLink`; ``down`` makes every call fail."""

    num_queues: int = 2
    device_features: int = FAKE_FEATURES
    config: bytearray = field(default_factory=lambda: bytearray(FAKE_CONFIG))
    down: bool = False
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    on_config_change: Callable[[], None] | None = None  # set by the transport

    def _check(self, what: str) -> None:
        if self.down:
            raise LinkDown(f"fake: {what} failed: backend gone")

    def get_config(self, offset: int, size: int) -> bytes:
        self.calls.append(("get_config", offset, size))
        self._check("GET_CONFIG")
        return bytes(self.config[offset:offset + size]).ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("set_config", offset, data))
        self._check("SET_CONFIG")
        self.config[offset:offset + len(data)] = data

    def start(self, driver_features: int, queues: Sequence[QueueStart]) -> None:
        self.calls.append(("start", driver_features, list(queues)))
        self._check("start")

    def stop(self) -> None:
        self.calls.append(("stop",))
        self._check("stop")

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


@dataclass
class FakeRouter:
    """Stands in for :class:`IrqRouter`: GSIs handed out from 24, calls recorded."""

    next_gsi: int = 24
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    bound: dict[int, int] = field(default_factory=dict)  # fd -> gsi

    def allocate(self) -> int:
        gsi, self.next_gsi = self.next_gsi, self.next_gsi + 1
        self.calls.append(("allocate", gsi))
        return gsi

    def set_msi(self, gsi: int, address_lo: int, address_hi: int, data: int) -> None:
        self.calls.append(("set_msi", gsi, address_lo, address_hi, data))

    def bind(self, fd: int, gsi: int) -> None:
        self.calls.append(("bind", fd, gsi))
        self.bound[fd] = gsi

    def unbind(self, fd: int) -> None:
        self.calls.append(("unbind", fd))
        self.bound.pop(fd, None)

    def irq_line(self, gsi: int, level: bool) -> None:
        self.calls.append(("irq_line", gsi, level))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]

    def clear(self) -> None:
        self.calls.clear()


@dataclass
class FakeVm:
    """The VM calls the transport and the router make, recorded in order."""

    ioeventfds: list[tuple[int, int, int, bool]] = field(default_factory=list)
    irqfds: list[tuple[int, int, bool]] = field(default_factory=list)
    routings: list[list[Any]] = field(default_factory=list)
    lines: list[tuple[int, bool]] = field(default_factory=list)
    fail_ioeventfd: bool = False

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        assert not pio and datamatch is None
        if self.fail_ioeventfd:
            raise OSError(28, "No space left on device")
        self.ioeventfds.append((fd, addr, length, deassign))

    def live_ioeventfds(self) -> set[tuple[int, int]]:
        """(fd, addr) pairs assigned and not deassigned since."""
        live: set[tuple[int, int]] = set()
        for fd, addr, _length, deassign in self.ioeventfds:
            if deassign:
                assert (fd, addr) in live, f"deassigned {fd}@{addr:#x} that was never assigned"
                live.discard((fd, addr))
            else:
                assert (fd, addr) not in live, f"{fd}@{addr:#x} assigned twice"
                live.add((fd, addr))
        return live

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        self.irqfds.append((fd, gsi, deassign))

    @staticmethod
    def default_routes() -> list[tuple[str, int]]:
        return [("irqchip", gsi) for gsi in range(24)]

    def set_gsi_routing(self, routes: Sequence[Any]) -> None:
        self.routings.append(list(routes))

    def irq_line(self, gsi: int, level: bool) -> None:
        self.lines.append((gsi, level))


@dataclass
class FakePump:
    """Stands in for :class:`IntxPump`: the watched callbacks, callable by hand."""

    watched: dict[int, Callable[[], None]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        assert fd not in self.watched, f"fd {fd} watched twice"
        self.calls.append(("watch", fd))
        self.watched[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.calls.append(("unwatch", fd))
        self.watched.pop(fd, None)

    def fire(self, fd: int) -> None:
        self.watched[fd]()
