"""The display under the core: SeaBIOS's ramfb VGA BIOS draws into guest
RAM, the display process scans it out over VNC, and VNC keys reach SeaBIOS
through the core's i8042 -- each checked against QEMU + KVM running the same
firmware, VGA BIOS and disk with ``-vga none -device ramfb -vnc``.

Both VMs are captured by a real VNC client (``vncdo`` from vncdotool, a
process of its own per capture).  The QEMU peer gets what the dvmm machine
has: no default devices, no kvmvapic option ROM, the virtio disk at slot 2,
the serial console (``etc/sercon-port``, which dvmm's "nographic" key
turns on).  One difference is expected and allowed where it occurs: the
VGA BIOS's software cursor blinks on timer ticks (SeaBIOS vgasrc/swcursor.c),
so a capture taken while the firmware waits for a key may or may not show
it; only that 8x16 character cell may differ then.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from corevm import CoreVM, clean, dvmm_argv, wait_until
from dvmm_core.boot.screen import DRAWN, SCREEN_TEXT, make_screen_disk
from PIL import Image, ImageChops

QEMU = shutil.which("qemu-system-x86_64")
VNCDO = str(Path(sys.executable).parent / "vncdo")
CELL_W, CELL_H = 8, 16  # the VGA BIOS's 8x16 font
MENU_WAIT_MS = 30000    # long enough for a VNC client to start and press a key
MENU = "Select boot device"

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(not os.path.exists(VNCDO), reason="vncdotool is not installed"),
]


def free_vnc_port(after: int = 5989) -> int:
    """A free TCP port above ``after`` and 5900 (QEMU takes a display number)."""
    for port in range(after + 1, 6900):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free VNC port")


def vncdo(port: int, *args: str) -> None:
    subprocess.run([VNCDO, "-s", f"127.0.0.1::{port}", *args], check=True, timeout=60,
                   stdin=subprocess.DEVNULL, capture_output=True)


def capture(port: int, path: Path) -> Image.Image:
    vncdo(port, "capture", str(path))
    return Image.open(path).convert("RGB")


class QemuPeer:
    """QEMU + KVM with the same firmware, ramfb and disk, VNC on ``port``."""

    def __init__(self, workdir: Path, disk: Path, port: int,
                 boot_menu_key: str | None = None) -> None:
        self.serial_path = workdir / "qemu-serial.log"
        sercon = workdir / "sercon-port"
        sercon.write_bytes((0x3F8).to_bytes(2, "little"))
        assert QEMU is not None
        argv = [QEMU, "-nodefaults", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                "-M", "pc", "-global", "apic-common.vapic=off", "-m", "128",
                "-bios", "/usr/share/seabios/bios.bin", "-vga", "none", "-device", "ramfb",
                "-drive", f"file={disk},if=none,id=d0,format=raw,readonly=on",
                "-device", "virtio-blk-pci,drive=d0,addr=2",
                "-fw_cfg", f"name=etc/sercon-port,file={sercon}",
                "-display", "none", "-vnc", f"127.0.0.1:{port - 5900}",
                "-serial", f"file:{self.serial_path}"]
        if boot_menu_key is not None:
            argv += ["-boot", f"menu=on,splash-time={MENU_WAIT_MS}"]
        if boot_menu_key == "f12":  # what dvmm run --boot-menu-key f12 adds
            (workdir / "menu-key").write_bytes((0x86).to_bytes(2, "little"))
            (workdir / "menu-msg").write_bytes(b"\nPress F12 for boot menu.\n\n")
            argv += ["-fw_cfg", f"name=etc/boot-menu-key,file={workdir / 'menu-key'}",
                     "-fw_cfg", f"name=etc/boot-menu-message,file={workdir / 'menu-msg'}"]
        self.log = open(workdir / "qemu.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def serial(self) -> str:
        return clean(self.serial_path.read_bytes()) if self.serial_path.exists() else ""

    def wait_serial(self, text: str, timeout: float = 90.0) -> None:
        wait_until(lambda: text in self.serial(), timeout, f"{text!r} on QEMU's serial",
                   None, lambda: self.serial()[-2000:])
        assert self.proc.poll() is None, "QEMU exited"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def screen_disk(tmp_path: Path) -> Path:
    return make_screen_disk(tmp_path / "screen.img")


@contextlib.contextmanager
def dvmm_vm(tmp_path: Path, disk: Path, extra: list[str], display: str = ""
            ) -> Iterator[tuple[CoreVM, int]]:
    """``dvmm run --display vnc=...`` (then ``display`` options) and its VNC
    port; stops cleanly."""
    port = free_vnc_port()
    (tmp_path / "dvmm").mkdir()
    args = ["--firmware", "seabios", "--memory", "128",
            "--display", f"vnc=127.0.0.1:{port}{display}", "--disk", str(disk), *extra]
    with CoreVM(tmp_path / "dvmm", args) as vm:
        yield vm, port
        assert vm.stop() == 0, vm.diagnostics()
        assert "Traceback" not in vm.stderr(), vm.diagnostics()


@contextlib.contextmanager
def qemu_peer(tmp_path: Path, disk: Path, after: int, boot_menu_key: str | None = None
              ) -> Iterator[tuple[QemuPeer, int]]:
    """The QEMU peer and its VNC port (above ``after``: dvmm's may not listen yet)."""
    port = free_vnc_port(after=after)
    (tmp_path / "qemu").mkdir()
    qemu = QemuPeer(tmp_path / "qemu", disk, port, boot_menu_key)
    try:
        yield qemu, port
    finally:
        qemu.close()


def text_box(rows: dict[int, list[tuple[int, str]]]) -> tuple[int, int, int, int]:
    """The pixel box around every character the boot program wrote."""
    left = min(col for line in rows.values() for col, _ in line)
    right = max(col + len(text) for line in rows.values() for col, text in line)
    return (left * CELL_W, min(rows) * CELL_H, right * CELL_W, (max(rows) + 1) * CELL_H)


def assert_same_picture(dvmm: Image.Image, qemu: Image.Image,
                        cursor: tuple[int, int] | None = None) -> None:
    """Equal pixel for pixel; with ``cursor`` (column, row), that cell may differ."""
    assert dvmm.size == qemu.size == (1024, 768)
    diff = ImageChops.difference(dvmm, qemu).getbbox()
    if diff is None:
        return
    assert cursor is not None, f"dvmm's capture differs from QEMU's in {diff}"
    col, row = cursor
    cell = (col * CELL_W, row * CELL_H, (col + 1) * CELL_W, (row + 1) * CELL_H)
    inside = (diff[0] >= cell[0] and diff[1] >= cell[1] and diff[2] <= cell[2]
              and diff[3] <= cell[3])
    assert inside, f"captures differ in {diff}, outside the cursor cell {cell}"


def test_firmware_ramfb_screen_matches_qemu(tmp_path: Path, screen_disk: Path) -> None:
    with dvmm_vm(tmp_path, screen_disk, []) as (vm, dvmm_port), \
            qemu_peer(tmp_path, screen_disk, dvmm_port) as (qemu, qemu_port):
        vm.wait_serial(DRAWN, timeout=120)
        qemu.wait_serial(DRAWN)
        ours = capture(dvmm_port, tmp_path / "dvmm.png")
        theirs = capture(qemu_port, tmp_path / "qemu.png")
        box = text_box(SCREEN_TEXT)
        assert ImageChops.difference(ours.crop(box), theirs.crop(box)).getbbox() is None, \
            "the text the boot program drew differs from QEMU's"
        assert len(ours.crop(box).getcolors() or []) >= 6  # text in several colours
        assert_same_picture(ours, theirs)  # the rest of the screen too
        assert "ramfb: framebuffer allocated" in vm.firmware(), vm.diagnostics()


@pytest.mark.parametrize("key", ["esc", "f12"])
def test_firmware_boot_menu_opens_on_a_vnc_key(tmp_path: Path, screen_disk: Path,
                                               key: str) -> None:
    """SeaBIOS 1.16 opens its menu on ESC; F12 (its old key, int 16h scan code
    0x86: an F12 press as set 2 07, translated to set 1 58) once the
    ``etc/boot-menu-key`` file says so."""
    extra = ["--boot-menu", str(MENU_WAIT_MS), "--boot-menu-key", key]
    prompt = f"Press {key.upper()} for boot menu"
    with dvmm_vm(tmp_path, screen_disk, extra) as (vm, dvmm_port):
        vm.wait_serial(prompt, timeout=120)
        vncdo(dvmm_port, "key", key)
        text = vm.wait_serial(MENU, timeout=60)
        assert "1. Virtio disk PCI:00:02.0" in vm.wait_serial("PCI:00:02.0"), text
        ours = capture(dvmm_port, tmp_path / "dvmm.png")
        assert DRAWN not in vm.serial()  # the menu waits: nothing booted
    # QEMU only now: its menu wait must not run out while dvmm boots.
    with qemu_peer(tmp_path, screen_disk, dvmm_port, key) as (qemu, qemu_port):
        qemu.wait_serial(prompt)
        vncdo(qemu_port, "key", key)
        qemu.wait_serial("PCI:00:02.0")
        theirs = capture(qemu_port, tmp_path / "qemu.png")
        # The menu ends with a blank line: the cursor waits at row 7, column 0.
        assert_same_picture(ours, theirs, cursor=(0, 7))
        assert ImageChops.difference(ours.crop((0, 64, 400, 112)),
                                     Image.new("RGB", (400, 48))).getbbox() is not None


@pytest.mark.parametrize("display", ["", ",gpu=virtio"])
def test_firmware_screen_survives_a_display_sigkill(tmp_path: Path, screen_disk: Path,
                                                    display: str) -> None:
    """The guest has halted (interrupts off) after drawing: only the core's
    resend of the ramfb configuration on ``device-restored`` can put the
    picture back on the restarted display process's screen.  With
    ``gpu=virtio`` the link is the virtio-gpu device's, restored by the
    generic vhost device path."""
    with dvmm_vm(tmp_path, screen_disk, [], display) as (vm, port):
        vm.wait_serial(DRAWN, timeout=120)
        vm.wait_stderr("display0: showing ramfb")
        before = capture(port, tmp_path / "before.png")
        (display,) = [p for p in vm.backends() if "dvmm_display" in " ".join(p.cmdline())
                      and "--standby-fd" not in p.cmdline()]
        os.kill(display.pid, signal.SIGKILL)
        vm.wait_stderr("display0: backend restored after", timeout=30)
        wait_until(lambda: vm.stderr().count("display0: showing ramfb") >= 2, 30,
                   "the ramfb configuration sent again", vm.proc, vm.diagnostics)
        after = capture(port, tmp_path / "after.png")
        assert ImageChops.difference(before, after).getbbox() is None
        assert len(after.crop(text_box(SCREEN_TEXT)).getcolors() or []) >= 6


def test_display_screenshot_equals_the_vnc_capture(tmp_path: Path, screen_disk: Path) -> None:
    """``dvmm display screenshot`` (control plane -> the display's ``screenshot``,
    a 1024x768 frame sent zlib-compressed) writes what a VNC client sees."""
    with dvmm_vm(tmp_path, screen_disk, []) as (vm, port):
        vm.wait_serial(DRAWN, timeout=120)
        vm.wait_stderr("display0: showing ramfb")
        assert vm.proc is not None
        out = tmp_path / "shot.png"
        done = subprocess.run([*dvmm_argv("display", "screenshot", "--pid", str(vm.proc.pid),
                                          "--out", str(out))],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{out}: 1024x768"
        shot = Image.open(out)
        assert shot.format == "PNG" and shot.mode == "RGB"
        vnc = capture(port, tmp_path / "vnc.png")
        assert ImageChops.difference(shot, vnc).getbbox() is None
        assert len(shot.crop(text_box(SCREEN_TEXT)).getcolors() or []) >= 6
        # The same VM asked for a display it does not have: one line, exit 1.
        done = subprocess.run([*dvmm_argv("display", "screenshot", "--pid", str(vm.proc.pid),
                                          "--name", "display9", "--out", str(out))],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "has no display" in done.stderr, done.stderr


def test_firmware_boots_beside_a_virtio_gpu_function(tmp_path: Path, screen_disk: Path) -> None:
    """``gpu=virtio``: SeaBIOS finds the virtio-gpu-pci function (a display
    controller, class 0380, which it runs no option ROM for) behind the disk,
    boots the disk, and the screen is still ramfb's, scanned out by the same
    display process that serves the virtio-gpu queues."""
    with dvmm_vm(tmp_path, screen_disk, [], display=",gpu=virtio") as (vm, port):
        vm.wait_serial(DRAWN, timeout=120)
        assert "init bdf=00:03.0 id=1af4:1050" in vm.firmware(), vm.diagnostics()
        vm.wait_stderr("display0: showing ramfb")
        shot = capture(port, tmp_path / "dvmm.png")
        assert len(shot.crop(text_box(SCREEN_TEXT)).getcolors() or []) >= 6
