"""ramfb under the core: the guest's RAMFBCfg written through fw_cfg DMA
the way SeaBIOS's vgasrc/ramfb.c writes it, checked as hostile input, and
handed to the display process (``DisplayLink``) over a real vhost-user
link (memory table only) and a real ZeroMQ control endpoint -- a stand-in
that records the ``ramfb`` commands it receives."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dvmm_core.machine.display import DisplayLink, DisplaySpec
from dvmm_core.machine.fw_cfg import DmaControl, FwCfg
from dvmm_core.machine.ramfb import (
    BLANK,
    DRM_FORMAT_XRGB8888,
    RAMFB_CFG,
    RAMFB_FILE,
    VGA_ROM_FILE,
    Ramfb,
    RamfbConfig,
    RamfbError,
    load_vga_rom,
    parse_ramfb_config,
)
from dvmm_core.run import parse_display
from dvmm_core.vhost_user_frontend import RamRegion, VhostUserLink
from dvmm_shared.cli import UsageError
from dvmm_shared.control import CommandServer
from dvmm_shared.memory import GuestMemory, memfd_region
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import DaemonThread, EchoBackend, EventRecorder

MiB = 1 << 20
RAM = 64 * MiB
HIGH = 1 << 32
# What SeaBIOS 1.16.2's ramfb VGA BIOS writes (notes/seabios.md section 6),
# scaled to this test's RAM: 1024x768 XRGB8888, stride 4096, 3 MiB.
FB_ADDR = RAM - 4 * MiB
SEABIOS_CFG = RAMFB_CFG.pack(FB_ADDR, DRM_FORMAT_XRGB8888, 0, 1024, 768, 4096)
DESC, BUF = 0x1000, 0x2000


@dataclass
class Guest:
    mem: GuestMemory
    regions: list[RamRegion]
    fds: list[int] = field(default_factory=list)


@pytest.fixture
def guest() -> Iterator[Guest]:
    """64 MiB at 0 and 1 MiB at 4 GiB: two regions, as the machine has."""
    mem, regions, fds = GuestMemory(), [], []
    for gpa, size in ((0, RAM), (HIGH, MiB)):
        fd, region = memfd_region(size, guest_addr=gpa)
        mem.add(region)
        fds.append(fd)
        regions.append(RamRegion(gpa, size, region.user_addr, fd, 0))
    yield Guest(mem, regions, fds)
    for fd in fds:
        os.close(fd)


def cfg(addr: int = FB_ADDR, fourcc: int = DRM_FORMAT_XRGB8888, width: int = 1024,
        height: int = 768, stride: int = 4096) -> bytes:
    return RAMFB_CFG.pack(addr, fourcc, 0, width, height, stride)


def test_seabios_config_is_accepted(guest: Guest) -> None:
    config = parse_ramfb_config(SEABIOS_CFG, guest.mem)
    assert config == RamfbConfig(FB_ADDR, DRM_FORMAT_XRGB8888, 1024, 768, 4096)
    assert config.command_args() == {"addr": FB_ADDR, "fourcc": 0x34325258, "width": 1024,
                                     "height": 768, "stride": 4096}


def test_stride_zero_means_packed_rows(guest: Guest) -> None:
    assert parse_ramfb_config(cfg(stride=0), guest.mem).stride == 4096


def test_address_zero_is_blank(guest: Guest) -> None:
    assert parse_ramfb_config(cfg(addr=0, fourcc=0, width=0), guest.mem) == BLANK


@pytest.mark.parametrize("data, why", [
    (SEABIOS_CFG[:27], "27 bytes"),
    (cfg(fourcc=0x36314752), "not XRGB8888"),       # RG16
    (cfg(width=15), "outside"),
    (cfg(height=12001), "outside"),
    (cfg(width=16001, stride=0), "outside"),
    (cfg(stride=4092), "stride"),                   # shorter than a row
    (cfg(stride=4098), "stride"),                   # not whole pixels
    (cfg(stride=1 << 31), "stride"),
    (cfg(addr=RAM - MiB), "not inside guest RAM"),  # runs past the end of RAM
    (cfg(addr=RAM), "not inside guest RAM"),        # in the PCI hole
    (cfg(addr=HIGH - 2 * MiB), "not inside guest RAM"),
    (cfg(addr=HIGH, width=1024, height=768), "not inside guest RAM"),  # 3 MiB > 1 MiB region
    (cfg(addr=(1 << 64) - 4096), "not inside guest RAM"),
])
def test_hostile_configs_are_refused(guest: Guest, data: bytes, why: str) -> None:
    with pytest.raises(RamfbError, match=why):
        parse_ramfb_config(data, guest.mem)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=28, max_size=28))
def test_any_accepted_config_lies_inside_one_ram_region(data: bytes) -> None:
    fd, region = memfd_region(RAM)
    try:
        mem = GuestMemory([region])
        try:
            config = parse_ramfb_config(data, mem)
        except RamfbError:
            return
        if config != BLANK:
            assert config.addr + config.stride * config.height <= RAM
            assert config.stride >= config.width * 4
    finally:
        os.close(fd)


# -- through fw_cfg DMA, as the VGA BIOS writes it --------------------------------

def dma(fw: FwCfg, mem: GuestMemory, key: int, op: int, length: int) -> int:
    """One DMA descriptor {control = key<<16 | SELECT | op, length, BUF};
    returns the control word the device left (0 = done)."""
    control = key << 16 | DmaControl.SELECT | op
    mem.write(DESC, struct.pack(">IIQ", control, length, BUF))
    fw.dma_transfer(DESC)
    return int.from_bytes(mem.read(DESC, 4), "big")


def file_key(fw: FwCfg, mem: GuestMemory, name: str) -> int:
    """The key of ``name`` from the file directory (key 0x19), as SeaBIOS reads it."""
    assert dma(fw, mem, 0x19, DmaControl.READ, 4096) == 0
    (count,) = struct.unpack(">I", mem.read(BUF, 4))
    for i in range(count):
        _size, key, _res, raw = struct.unpack(">IHH56s", mem.read(BUF + 4 + 64 * i, 64))
        if raw.rstrip(b"\0").decode() == name:
            return int(key)
    raise KeyError(name)


def dma_write(fw: FwCfg, mem: GuestMemory, name: str, data: bytes) -> int:
    key = file_key(fw, mem, name)
    mem.write(BUF, data)
    return dma(fw, mem, key, DmaControl.WRITE, len(data))


def test_fw_cfg_dma_write_reaches_the_display(guest: Guest) -> None:
    seen: list[RamfbConfig] = []
    fw, ramfb = FwCfg(guest.mem), Ramfb(guest.mem, seen.append)
    ramfb.attach(fw, b"\x55\xaa" + bytes(510))
    assert fw.file_data(VGA_ROM_FILE)[:2] == b"\x55\xaa"
    assert fw.file_data(RAMFB_FILE) == bytes(28)
    assert dma_write(fw, guest.mem, RAMFB_FILE, SEABIOS_CFG) == 0
    assert seen == [RamfbConfig(FB_ADDR, DRM_FORMAT_XRGB8888, 1024, 768, 4096)]
    assert ramfb.config == seen[0]


def test_fw_cfg_refuses_oversized_write_and_bad_config_changes_nothing(guest: Guest) -> None:
    seen: list[RamfbConfig] = []
    fw, ramfb = FwCfg(guest.mem), Ramfb(guest.mem, seen.append)
    ramfb.attach(fw, b"\x55\xaa" + bytes(510))
    assert dma_write(fw, guest.mem, RAMFB_FILE, SEABIOS_CFG + b"x") & DmaControl.ERROR
    assert dma_write(fw, guest.mem, RAMFB_FILE, cfg(addr=RAM)) == 0  # DMA fine, config not
    assert seen == [] and ramfb.config is None and ramfb.rejected == 1
    assert dma_write(fw, guest.mem, RAMFB_FILE, SEABIOS_CFG) == 0
    assert len(seen) == 1


def test_debian_vga_rom_is_an_option_rom() -> None:
    path = "/usr/share/seabios/vgabios-ramfb.bin"
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed (Debian package seabios)")
    rom = load_vga_rom(path)
    assert rom[:2] == b"\x55\xaa" and len(rom) == rom[2] * 512


# -- DisplayLink: link (memory table only) + ramfb commands ------------------------

class StandIn:
    """The display process's control endpoint: records ``ramfb`` commands;
    ``hold`` blocks the handler until released."""

    def __init__(self, endpoint: str) -> None:
        self.commands: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()  # a ramfb command is being handled
        self.server = CommandServer(endpoint, {"ramfb": self._ramfb})
        self.server.start()

    def _ramfb(self, request: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        self.hold.wait(10)
        with self.cond:
            self.commands.append({k: v for k, v in request.items() if k != "cmd"})
            self.cond.notify_all()
        return {}

    def wait(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.commands) >= count, timeout), \
                self.commands
            return list(self.commands)


@dataclass
class FakeBackend:
    socket: str
    control: str
    proc: None = None


class FakeSupervisor:
    def wait_for_socket(self, backend: FakeBackend, timeout: float = 15.0,
                        cancelled: Any = None) -> None:
        pass  # the in-process daemon listens before the test starts the link


@dataclass
class Host:
    guest: Guest
    supervisor: FakeSupervisor = field(default_factory=FakeSupervisor)
    links: dict[str, VhostUserLink] = field(default_factory=dict)
    events: EventRecorder = field(default_factory=EventRecorder)
    failures: list[str] = field(default_factory=list)

    def ram_regions(self) -> list[RamRegion]:
        return self.guest.regions

    def guest_memory(self) -> GuestMemory:
        return self.guest.mem

    def publish(self, event: str, fields: dict[str, Any]) -> None:
        self.events(event, fields)

    def start_failed(self, reason: str) -> None:
        self.failures.append(reason)


@pytest.fixture
def rig(tmp_path: Path, guest: Guest) -> Iterator[tuple[Host, DisplayLink, StandIn]]:
    sock, endpoint = tmp_path / "display0.sock", f"ipc://{tmp_path}/display0.ctl"
    with DaemonThread(EchoBackend(queues=2), sock):
        host = Host(guest)
        stand_in = StandIn(endpoint)
        display = DisplayLink(host, FakeBackend(str(sock), endpoint))  # type: ignore[arg-type]
        try:
            yield host, display, stand_in
        finally:
            display.close()
            stand_in.hold.set()
            stand_in.server.close()


def test_link_hands_over_guest_memory_and_ramfb_is_sent(
        rig: tuple[Host, DisplayLink, StandIn]) -> None:
    host, display, stand_in = rig
    config = RamfbConfig(FB_ADDR, DRM_FORMAT_XRGB8888, 1024, 768, 4096)
    display.show(config)  # before the link is up: delivered once it is
    display.begin()
    assert stand_in.wait(1) == [config.command_args()]
    assert host.links["display0"].connected and host.failures == []


def test_restored_display_gets_the_screen_again(rig: tuple[Host, DisplayLink, StandIn]) -> None:
    _, display, stand_in = rig
    display.begin()
    config = RamfbConfig(FB_ADDR, DRM_FORMAT_XRGB8888, 800, 600, 3200)
    display.show(config)
    stand_in.wait(1)
    display.on_event("device-restored", {"name": "blk0"})  # another device: nothing
    display.on_event("device-restored", {"name": "display0"})
    assert stand_in.wait(2)[1] == config.command_args()


def test_show_never_waits_for_the_display(rig: tuple[Host, DisplayLink, StandIn]) -> None:
    _, display, stand_in = rig
    display.begin()
    assert display.wait_ready(10)
    stand_in.hold.clear()  # the display process takes its time answering
    first = RamfbConfig(FB_ADDR, DRM_FORMAT_XRGB8888, 640, 480, 2560)
    display.show(first)
    assert stand_in.entered.wait(10)
    display.show(BLANK)  # returns at once although the first is still in flight
    stand_in.hold.set()
    assert stand_in.wait(2) == [first.command_args(), BLANK.command_args()]


def test_undeliverable_ramfb_is_retried_until_the_display_listens(
        tmp_path: Path, guest: Guest) -> None:
    sock, endpoint = tmp_path / "d.sock", f"ipc://{tmp_path}/late.ctl"
    with DaemonThread(EchoBackend(), sock):
        display = DisplayLink(Host(guest), FakeBackend(str(sock), endpoint))  # type: ignore[arg-type]
        display.begin()
        display.show(RamfbConfig(FB_ADDR, DRM_FORMAT_XRGB8888, 1024, 768, 4096))
        stand_in = StandIn(endpoint)  # the display's control endpoint opens late
        try:
            assert len(stand_in.wait(1)) == 1
        finally:
            display.close()
            stand_in.server.close()


def test_display_spec_backend_args() -> None:
    spec = DisplaySpec("127.0.0.1:5901", "/tmp/pw")
    assert spec.backend_args("ipc:///r/core.ctl") == [
        "--vnc", "127.0.0.1:5901", "--core-control", "ipc:///r/core.ctl",
        "--password-file", "/tmp/pw"]


@pytest.mark.parametrize("text, why", [
    ("vnc=5900", "HOST:PORT"),
    ("vnc=127.0.0.1:65536", "HOST:PORT"),
    ("vnc=:5900", "HOST:PORT"),
    ("password-file=/nonexistent", "does not exist"),
    ("vnc=127.0.0.1:5900,gpu=vga", "gpu= must be virtio"),
    ("vnc=127.0.0.1:5900,scale=2", "bad option"),
    ("", "give vnc="),
])
def test_display_option_errors_are_one_line(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as info:
        parse_display(text)
    assert "\n" not in str(info.value)


def test_display_option_parses(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    assert parse_display(f"vnc=127.0.0.1:5901,password-file={pw}") == DisplaySpec(
        "127.0.0.1:5901", str(pw))
    assert parse_display("vnc=[::1]:0") == DisplaySpec("[::1]:0")
    assert parse_display("vnc=127.0.0.1:0,gpu=virtio") == DisplaySpec("127.0.0.1:0", None,
                                                                      "virtio")
