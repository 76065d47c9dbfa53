"""virtio-input end to end: a real display process serving a keyboard and a
tablet over vhost-user-input, the synthetic vhost-user frontend playing the
driver (the probe of Linux's drivers/virtio/virtio_input.c: select/subsel
written, size and item read back; 8-byte event buffers posted), and a VNC
client whose keys and pointer must arrive as evdev events in those buffers
-- and no longer at the core's PS/2 once the driver runs."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dvmm_display.evdev import (
    ABS_MAX,
    ABS_X,
    ABS_Y,
    BTN_LEFT,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_SYN,
    EVENT,
    LED_CAPSL,
    CfgSelect,
)
from dvmm_shared.control import CommandServer, command
from dvmm_shared.driver import Buf
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_testing.rfbclient import RfbClient

KEY_A, KEY_LEFTSHIFT, KEY_B = 30, 42, 48


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class FakeCore:
    def __init__(self, endpoint: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = CommandServer(endpoint, {"input": self.input})
        self.server.start()

    def input(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.events.extend(req["events"])
        return {}


@dataclass
class Display:
    tmp: Path
    control: str
    port: int
    core: FakeCore

    def stats(self) -> dict[str, Any]:
        device: dict[str, Any] = command(self.control, "stats", timeout=5)["device"]
        return device


@pytest.fixture
def display(tmp_path: Path) -> Iterator[Display]:
    core = FakeCore(f"ipc://{tmp_path}/core.ctl")
    control, log = f"ipc://{tmp_path}/d.ctl", tmp_path / "log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(tmp_path / "gpu.sock"),
                  "--vnc", "127.0.0.1:0", "--control", control,
                  "--core-control", core.server.endpoint,
                  "--input-socket", str(tmp_path / "kbd.sock"),
                  "--tablet-socket", str(tmp_path / "tab.sock")], log)
    try:
        wait_for(lambda: os.path.exists(control[6:]) or proc.poll() is not None, "listening")
        assert proc.poll() is None, log_tail(log)
        assert (tmp_path / "kbd.sock").exists() and (tmp_path / "tab.sock").exists()
        yield Display(tmp_path, control, command(control, "stats")["device"]["vnc"]["port"],
                      core)
    finally:
        status = stop(proc)
        core.server.close()
        assert status == 0, log_tail(log)


class Driver:
    """What Linux's virtio_input driver does with the device."""

    def __init__(self, vm: SyntheticVM, buffers: int = 32) -> None:
        self.vm = vm
        self.bufs: dict[int, int] = {}
        for _ in range(buffers):
            self.post()
        vm.rings[0].kick.signal()

    def post(self, size: int = EVENT.size) -> None:
        addr = self.vm.alloc(size, 8)
        self.bufs[self.vm.rings[0].queue.add([Buf(addr, size, write=True)])] = addr

    def select(self, select: int, subsel: int) -> bytes:
        fe = self.vm.frontend
        assert fe is not None
        fe.set_config(0, bytes([select]))
        fe.set_config(1, bytes([subsel]))
        size = fe.get_config(2, 1)[0]
        return fe.get_config(8, size) if size else b""

    def events(self, count: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        while len(out) < count:
            for head, written in self.vm.rings[0].wait_used():
                assert written == EVENT.size
                out.append(EVENT.unpack(self.vm.mem.read(self.bufs.pop(head), EVENT.size)))
                self.post()  # the driver re-posts every buffer (virtinput_recv_events)
            self.vm.rings[0].kick.signal()
        return out


def connect(path: Path) -> tuple[SyntheticVM, Driver]:
    vm = SyntheticVM(mem_size=1 << 20)
    vm.connect(str(path), bit(VIRTIO_F_VERSION_1), num_queues=2, queue_size=64)
    return vm, Driver(vm)


def test_keys_reach_the_virtio_keyboard_not_ps2(display: Display) -> None:
    with RfbClient("127.0.0.1", display.port) as vnc:
        vnc.key(ord("q"), True)
        vnc.key(ord("q"), False)
        # no driver yet: the core's PS/2 keyboard gets them
        wait_for(lambda: len(display.core.events) == 2, "PS/2 events at the core")
        vm, drv = connect(display.tmp / "kbd.sock")
        with vm:
            assert drv.select(CfgSelect.ID_NAME, 0) == b"dvmm virtio keyboard"
            assert drv.select(CfgSelect.EV_BITS, EV_ABS) == b""
            keys = drv.select(CfgSelect.EV_BITS, EV_KEY)
            assert keys[KEY_A // 8] >> (KEY_A % 8) & 1
            wait_for(lambda: display.stats()["virtio_input"]["keyboard"]["active"],
                     "the keyboard to be active")
            for sym, down in ((0xFFE1, True), (ord("B"), True), (ord("B"), False),
                              (0xFFE1, False)):
                vnc.key(sym, down)
            assert drv.events(8) == [
                (EV_KEY, KEY_LEFTSHIFT, 1), (EV_SYN, 0, 0), (EV_KEY, KEY_B, 1), (EV_SYN, 0, 0),
                (EV_KEY, KEY_B, 0), (EV_SYN, 0, 0), (EV_KEY, KEY_LEFTSHIFT, 0),
                (EV_SYN, 0, 0)]
    assert len(display.core.events) == 2  # nothing more went to PS/2
    assert display.stats()["input"]["keys"] == 2


def test_pointer_reaches_the_virtio_tablet(display: Display) -> None:
    vm, drv = connect(display.tmp / "tab.sock")
    with vm, RfbClient("127.0.0.1", display.port) as vnc:
        assert drv.select(CfgSelect.ABS_INFO, ABS_Y)[:8] == (0).to_bytes(4, "little") + (
            ABS_MAX).to_bytes(4, "little")
        wait_for(lambda: display.stats()["virtio_input"]["tablet"]["active"], "tablet active")
        w, h = vnc.width, vnc.height  # no framebuffer yet: the blank screen
        vnc.pointer(w - 1, 0, 1)
        assert drv.events(4) == [(EV_ABS, ABS_X, ABS_MAX), (EV_ABS, ABS_Y, 0),
                                 (EV_KEY, BTN_LEFT, 1), (EV_SYN, 0, 0)]
        vnc.pointer(0, h - 1, 0)
        assert drv.events(4) == [(EV_ABS, ABS_X, 0), (EV_ABS, ABS_Y, ABS_MAX),
                                 (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0)]
    assert not display.core.events


def test_status_queue_and_hostile_buffers(display: Display) -> None:
    vm = SyntheticVM(mem_size=1 << 20)
    vm.connect(str(display.tmp / "kbd.sock"), bit(VIRTIO_F_VERSION_1), num_queues=2,
               queue_size=64)
    with vm, RfbClient("127.0.0.1", display.port) as vnc:
        # the LED state a driver sends on the status queue (5.8.6.2)
        led = vm.alloc(EVENT.size, 8)
        vm.mem.write(led, EVENT.pack(EV_LED, LED_CAPSL, 1))
        vm.rings[1].queue.add([Buf(led, EVENT.size)])
        vm.rings[1].kick.signal()
        assert vm.rings[1].wait_used() != []
        assert display.stats()["virtio_input"]["keyboard"]["leds"] == 1 << LED_CAPSL
        wait_for(lambda: display.stats()["virtio_input"]["keyboard"]["active"], "active")
        # a too-short event buffer comes back empty; the next one gets the event
        events = vm.rings[0].queue
        short = events.add([Buf(vm.alloc(4, 8), 4, write=True)])
        good_addr = vm.alloc(EVENT.size, 8)
        good = events.add([Buf(good_addr, EVENT.size, write=True)])
        vm.rings[0].kick.signal()
        vnc.key(ord("a"), True)
        used: list[tuple[int, int]] = []
        while len(used) < 2:
            used += vm.rings[0].wait_used()
        assert used == [(short, 0), (good, EVENT.size)]
        assert EVENT.unpack(vm.mem.read(good_addr, EVENT.size)) == (EV_KEY, KEY_A, 1)
        stats = display.stats()["virtio_input"]["keyboard"]
        assert stats["bad_chains"] == 1 and stats["pending"] == 1  # the SYN waits
