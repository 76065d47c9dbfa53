"""virtio-input conformance: QEMU's vhost-user-input-pci against dvmm's display process.

1. QEMU (TCG) + the Debian guest's virtio_input and evdev drivers: a VNC
   client types and moves the pointer, and the guest's
   ``/dev/input/event*`` of the dvmm keyboard and tablet must see exactly
   those events.  QEMU 7.2 refuses vhost-user-input-pci under TCG (its
   ``vhost_user_backend_dev_init`` wants ioeventfds, i.e. KVM: "vhost
   initialization failed: requires kvm"), and no Linux boots under this
   machine's KVM (kvm_pvm), so on these machines the test is skipped with
   QEMU's own words; it runs wherever QEMU allows the device under TCG or
   Linux boots under KVM.
2. QEMU with KVM and no guest driver (the CPUs never start): QEMU's
   vhost-user-input frontend connects to both devices and negotiates with
   them -- what QEMU accepts of the backend, checked through QMP's
   ``x-query-virtio-status``.  Runs here.

The driver's side of the protocol (config selection, event buffers, status
queue) is covered without QEMU in tests/unit/test_input_device.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dvmm_shared.control import command
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_testing import QemuGuest
from dvmm_testing.qemu import QemuStartError
from dvmm_testing.rfbclient import RfbClient

pytestmark = pytest.mark.conformance

EV_SYN, EV_KEY, EV_ABS = 0, 1, 3
KEY_LEFTSHIFT, KEY_D, KEY_V = 42, 32, 47
ABS_X, ABS_Y, BTN_LEFT = 0, 1, 0x110
INPUT_EVENT_SIZE = 24  # struct input_event on x86_64: timeval, u16 type, u16 code, s32 value


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Display:
    tmp: Path
    control: str
    port: int

    @property
    def kbd(self) -> Path:
        return self.tmp / "kbd.sock"

    @property
    def tablet(self) -> Path:
        return self.tmp / "tab.sock"

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id=kbd,path={self.kbd}",
                "-device", "vhost-user-input-pci,chardev=kbd",
                "-chardev", f"socket,id=tab,path={self.tablet}",
                "-device", "vhost-user-input-pci,chardev=tab"]

    def input_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = command(self.control, "stats", timeout=5)["device"]
        return stats["virtio_input"]  # type: ignore[no-any-return]


@pytest.fixture
def display(tmp_path: Path) -> Iterator[Display]:
    control, log = f"ipc://{tmp_path}/d.ctl", tmp_path / "display.log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(tmp_path / "gpu.sock"),
                  "--vnc", "127.0.0.1:0", "--control", control,
                  "--input-socket", str(tmp_path / "kbd.sock"),
                  "--tablet-socket", str(tmp_path / "tab.sock")], log)
    try:
        wait_for(lambda: os.path.exists(control[6:]) or proc.poll() is not None, "listening")
        assert proc.poll() is None, log_tail(log)
        yield Display(tmp_path, control, command(control, "stats")["device"]["vnc"]["port"])
    finally:
        status = stop(proc)
        print(log_tail(log))
        assert status == 0, log_tail(log)


def event_device(vm: QemuGuest, name: str) -> str:
    out = vm.check("for e in /sys/class/input/event*; do "
                   "echo \"$(cat $e/device/name)=${e##*/}\"; done")
    for line in out.splitlines():
        dev_name, _, node = line.rpartition("=")
        if dev_name == name:
            return f"/dev/input/{node}"
    raise AssertionError(f"no input device named {name!r} in the guest:\n{out}")


def start_capture(vm: QemuGuest, dev: str, out: str) -> None:
    vm.check(f"dd if={dev} of={out} bs={INPUT_EVENT_SIZE} count=256 "
             "</dev/null >/dev/null 2>&1 & echo $! >/tmp/dd.pid")
    # dd has the device open before anything is sent (evdev keeps no history)
    wait_for(lambda: vm.run(f"ls -l /proc/$(cat /tmp/dd.pid)/fd | grep -q {dev}").rc == 0,
             f"dd to open {dev}")


def captured(vm: QemuGuest, path: str, count: int) -> list[tuple[int, int, int]]:
    """The first ``count`` events other than SYN_REPORT and autorepeat (value 2)."""
    events: list[tuple[int, int, int]] = []

    def enough() -> bool:
        raw = bytes(int(b, 16) for b in vm.check(f"od -An -v -tx1 {path}").split())
        events[:] = []
        for off in range(0, len(raw) - INPUT_EVENT_SIZE + 1, INPUT_EVENT_SIZE):
            t = int.from_bytes(raw[off + 16:off + 18], "little")
            c = int.from_bytes(raw[off + 18:off + 20], "little")
            v = int.from_bytes(raw[off + 20:off + 24], "little", signed=True)
            if t != EV_SYN and v != 2:
                events.append((t, c, v))
        return len(events) >= count

    wait_for(enough, f"{count} events in {path}")
    return events[:count]


def test_linux_evdev_sees_vnc_input(display: Display, tmp_path: Path) -> None:
    try:
        vm = QemuGuest(display.qemu_args(), log_dir=tmp_path / "qemu")
        vm.start()
    except QemuStartError as exc:
        words = str(exc).strip().splitlines()[-1]
        if "requires kvm" in words:
            pytest.skip(f"QEMU refuses vhost-user-input-pci here: {words}")
        raise
    with vm:
        kbd, tablet = event_device(vm, "dvmm virtio keyboard"), event_device(
            vm, "dvmm virtio tablet")
        start_capture(vm, kbd, "/tmp/kbd.ev")
        with RfbClient("127.0.0.1", display.port) as vnc:
            for sym, down in ((0xFFE1, True), (ord("D"), True), (ord("D"), False),
                              (0xFFE1, False), (ord("v"), True), (ord("v"), False)):
                vnc.key(sym, down)
            assert captured(vm, "/tmp/kbd.ev", 6) == [
                (EV_KEY, KEY_LEFTSHIFT, 1), (EV_KEY, KEY_D, 1), (EV_KEY, KEY_D, 0),
                (EV_KEY, KEY_LEFTSHIFT, 0), (EV_KEY, KEY_V, 1), (EV_KEY, KEY_V, 0)]
            start_capture(vm, tablet, "/tmp/tab.ev")
            vnc.pointer(vnc.width - 1, 0, 1)
            assert captured(vm, "/tmp/tab.ev", 3) == [
                (EV_ABS, ABS_X, 0x7FFF), (EV_ABS, ABS_Y, 0), (EV_KEY, BTN_LEFT, 1)]


def qmp(sock: socket.socket, reader: Any, cmd: str, **args: Any) -> Any:
    sock.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
    while True:
        reply = json.loads(reader.readline())
        if "return" in reply or "error" in reply:
            assert "error" not in reply, reply
            return reply["return"]


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")
def test_qemu_frontend_negotiates_with_both_devices(display: Display, tmp_path: Path) -> None:
    qmp_path = tmp_path / "qmp.sock"
    log = tmp_path / "qemu.log"
    proc = spawn(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                  "-nodefaults", "-display", "none", "-S", "-m", "128",
                  "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
                  "-numa", "node,memdev=mem", *display.qemu_args(),
                  "-qmp", f"unix:{qmp_path},server=on,wait=off"], log)
    try:
        wait_for(lambda: qmp_path.exists() or proc.poll() is not None, "QEMU's QMP socket")
        assert proc.poll() is None, log_tail(log)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(qmp_path))
            reader = sock.makefile("r")
            reader.readline()  # greeting
            qmp(sock, reader, "qmp_capabilities")
            devices = qmp(sock, reader, "x-query-virtio")
            assert [d["name"] for d in devices] == ["virtio-input", "virtio-input"]
            for d in devices:
                status = qmp(sock, reader, "x-query-virtio-status", path=d["path"])
                assert status["device-id"] == 18 and status["num-vqs"] == 2
                # the device features are what GET_FEATURES answered (QEMU adds
                # its transport bits); PROTOCOL_FEATURES only a vhost-user backend offers
                features = json.dumps(status["host-features"])
                assert "VHOST_USER_F_PROTOCOL_FEATURES" in features
                assert "VIRTIO_F_VERSION_1" in features
    finally:
        status_code = stop(proc)
        print(log_tail(log))
    assert status_code in (0, -15), log_tail(log)
