"""A device's first access waits for its backend (``machine/vhost_devices``), and the
bus's per-address cache follows (un)registration (``machine/bus``).

The connector's real work (socket, vhost-user negotiation) is replaced by a
gate the test opens, so the order of events is the test's; the real
bring-up runs in the core tier (SeaBIOS booting from a dvmm blk backend).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dvmm_core.machine.bus import Bus
from dvmm_core.machine.pci import PciBus, PciDevice
from dvmm_core.machine.vhost_devices import DeviceStart, PendingFunction, VhostDevice
from dvmm_core.vhost_user_frontend import LinkDown

VENDOR = 0x1AF4


class FakeHost:
    """The machine, as far as a device's start-up is concerned."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.links: dict[str, Any] = {}

    def start_failed(self, reason: str) -> None:
        self.failures.append(reason)


class GatedDevice(VhostDevice):
    """A device whose bring-up waits for the test's gate, then succeeds or fails."""

    def __init__(self, host: FakeHost) -> None:
        super().__init__(host, "blk0", 2, 60, socket="/nonexistent")  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.fail: str | None = None
        self.built = PciDevice(VENDOR, 0x1042, 0x010000)

    def _bring_up(self) -> Any:
        assert self.gate.wait(30)
        if self.fail is not None:
            raise LinkDown(self.fail)
        return self.built


@pytest.fixture
def rig() -> Iterator[tuple[FakeHost, GatedDevice, PciBus]]:
    host = FakeHost()
    device = GatedDevice(host)
    pci = PciBus()
    pci.add(2, PendingFunction(device, pci, 2))
    device.begin()
    yield host, device, pci
    device.gate.set()
    device.cancel()


def read_in_thread(pci: PciBus) -> tuple[threading.Thread, list[int]]:
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(pci.config_read(0, 2, 0, 0, 2)))
    t.start()
    return t, got


def test_first_access_waits_for_the_backend_then_sees_the_device(rig: Any) -> None:
    host, device, pci = rig
    reader, got = read_in_thread(pci)
    reader.join(0.2)
    assert reader.is_alive() and not got  # the guest's vCPU waits ...
    device.gate.set()                      # ... until the backend is up
    reader.join(10)
    assert got == [VENDOR]
    assert pci.get(2) is device.built      # the real function took the slot
    assert device.state is DeviceStart.READY and not host.failures
    assert pci.config_read(0, 2, 0, 2, 2) == 0x1042


def test_a_backend_that_never_comes_up_stops_the_start(rig: Any) -> None:
    host, device, pci = rig
    device.fail = "nobody listens on /nonexistent"
    reader, got = read_in_thread(pci)
    device.gate.set()
    reader.join(10)
    assert got == [0xFFFF]                  # no device
    assert host.failures == ["nobody listens on /nonexistent"]
    assert device.state is DeviceStart.FAILED
    assert isinstance(pci.get(2), PendingFunction)


def test_stopping_the_machine_releases_a_waiting_vcpu(rig: Any) -> None:
    host, device, pci = rig
    reader, got = read_in_thread(pci)
    reader.join(0.2)
    device.cancel()
    reader.join(10)
    assert got == [0xFFFF] and device.state is DeviceStart.CANCELLED
    device.gate.set()  # the connector finishing late changes nothing
    assert device.wait(1) is None and not host.failures


def test_a_device_has_a_socket_or_a_backend() -> None:
    with pytest.raises(ValueError):
        VhostDevice(FakeHost(), "x", 2, 60)  # type: ignore[arg-type]


# -- the bus cache --------------------------------------------------------------------

class Reg:
    def __init__(self, value: int) -> None:
        self.value = value
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.value + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_bus_cache_follows_registration() -> None:
    bus = Bus("pio")
    a, b = Reg(0x10), Reg(0x20)
    bus.register(0x80, 4, a, "a")
    assert bus.read(0x82, 1) == 0x12 and bus.read(0x82, 1) == 0x12  # miss, then hit
    bus.write(0x81, 2, 0xBEEF)
    assert a.writes == [(1, 2, 0xBEEF)]
    bus.unregister(0x80)
    assert bus.read(0x82, 1) == 0xFF          # gone: open bus, not the cached device
    bus.write(0x81, 1, 1)
    assert a.writes == [(1, 2, 0xBEEF)]
    bus.register(0x82, 2, b, "b")
    assert bus.read(0x82, 2) == 0x20 and bus.read(0x80, 4) == 0xFFFFFFFF


def test_bus_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import dvmm_core.machine.bus as busmod

    monkeypatch.setattr(busmod, "CACHE_LIMIT", 4)
    bus = Bus("mmio")
    bus.register(0x1000, 0x1000, Reg(0), "bar")
    assert [bus.read(0x1000 + i, 4) for i in range(16)] == list(range(16))
    assert len(bus._hits) == 4


def test_an_unserialised_bus_dispatches_the_same() -> None:
    bus = Bus("pio", serialize=False)
    reg = Reg(0x30)
    bus.register(0x3F8, 8, reg, "com1")
    assert bus.lock is None
    assert bus.read(0x3F9, 1) == 0x31 and bus.read(0x3F0, 1) == 0xFF
    bus.write(0x3F8, 1, 0x53)
    assert reg.writes == [(0, 1, 0x53)]


def test_the_intx_pump_starts_with_its_first_watch() -> None:
    import os

    from dvmm_core.machine.intx import IntxPump

    idle = IntxPump()
    idle.unwatch(5)  # nothing watched, nothing started
    idle.close()
    pump = IntxPump()
    fired = threading.Event()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        pump.watch(efd, fired.set)
        os.eventfd_write(efd, 1)
        assert fired.wait(10)
        pump.unwatch(efd)
    finally:
        pump.close()
        os.close(efd)
