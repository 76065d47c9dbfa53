"""The display process against real VNC clients nobody here wrote.

A real ``python -m dvmm_display`` process is handed guest memory by the
synthetic vhost-user frontend; the test writes a picture into that memory
and points the "ramfb" command at it.  Then vncdotool (its ``vncdo``
command, and its library asking for ZRLE) and asyncvnc connect at the same
time and must capture exactly that picture; the test's own RFC 6143 client
checks what only the wire shows (damage rectangles, drops), and a fake core
receives the input events.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dvmm_shared.control import CommandServer, ControlError, command
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_testing.rfbclient import AuthRefused, RfbClient

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")
asyncvnc = pytest.importorskip("asyncvnc")
pytest.importorskip("vncdotool")

pytestmark = [
    pytest.mark.conformance,
    # the client libraries still use cryptography's single-key TripleDES
    pytest.mark.filterwarnings("ignore:.*TripleDES"),
]

BIN = Path(sys.executable).parent
PASSWORD = "dvmm-pw"
W, H = 320, 240
STRIDE = W * 4 + 256  # padded rows, as a firmware may lay them out
XRGB8888 = 0x34325258

ZRLE_CAPTURE = """
import sys
from vncdotool import api, client, rfb
class Zrle(client.VNCDoToolClient):
    encoding = rfb.Encoding.ZRLE
class Factory(client.VNCDoToolFactory):
    protocol = Zrle
c = api.connect(sys.argv[1], password=sys.argv[2], factory_class=Factory, timeout=30)
c.captureScreen(sys.argv[3])
c.disconnect()
api.shutdown()
"""


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sample_picture() -> Any:
    """Gradients, primary colour blocks and text: every channel and edge counts."""
    img = Image.new("RGB", (W, H))
    img.putdata([(x * 255 // W, y * 255 // H, (x ^ y) & 0xFF) for y in range(H) for x in range(W)])
    draw = ImageDraw.Draw(img)
    for i, colour in enumerate(["red", "lime", "blue", "white", "black"]):
        draw.rectangle([10 + 40 * i, 10, 40 + 40 * i, 40], fill=colour)
    draw.text((20, 200), "dvmm display: ramfb scanout", fill="yellow")
    return img


@dataclass
class Display:
    proc: subprocess.Popen[bytes]
    log: Path
    control: str
    vm: SyntheticVM
    fb: int
    port: int

    def write_picture(self, img: Any) -> None:
        raw = img.tobytes("raw", "BGRX")
        for y in range(H):
            self.vm.mem.write(self.fb + y * STRIDE, raw[y * W * 4:(y + 1) * W * 4])

    def stats(self) -> dict[str, Any]:
        reply = command(self.control, "stats", timeout=5)
        device: dict[str, Any] = reply["device"]
        return device


class FakeCore:
    """The core's control endpoint, recording "input" commands."""

    def __init__(self, endpoint: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = CommandServer(endpoint, {"input": self.input})
        self.server.start()

    def input(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.events.extend(req["events"])
        return {}


@pytest.fixture
def core(tmp_path: Path) -> Iterator[FakeCore]:
    fake = FakeCore(f"ipc://{tmp_path}/core.ctl")
    yield fake
    fake.server.close()


@pytest.fixture
def display(tmp_path: Path, core: FakeCore) -> Iterator[Display]:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    sock, control = tmp_path / "gpu.sock", f"ipc://{tmp_path}/display.ctl"
    log = tmp_path / "display.log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(sock),
                  "--vnc", "127.0.0.1:0", "--password-file", str(tmp_path / "pw"),
                  "--control", control, "--core-control", core.server.endpoint,
                  "--client-timeout", "5"], log)
    vm = SyntheticVM(mem_size=8 << 20)
    try:
        wait_for(lambda: (sock.exists() and os.path.exists(control[6:]))
                 or proc.poll() is not None, "the display process to listen")
        assert proc.poll() is None, log_tail(log)
        vm.connect(str(sock), bit(VIRTIO_F_VERSION_1), num_queues=2)
        fb = vm.alloc(STRIDE * H)
        d = Display(proc, log, control, vm, fb, 0)
        d.write_picture(sample_picture())
        reply = command(control, "ramfb", addr=fb, width=W, height=H, fourcc=XRGB8888,
                        stride=STRIDE)
        assert reply["mapped"] is True
        d.port = d.stats()["vnc"]["port"]
        yield d
    finally:
        vm.close()
        status = stop(proc)
        print(log_tail(log))
    assert status == 0, log_tail(log)  # a clean SIGTERM exit


def rgb(img: Any) -> bytes:
    data: bytes = img.convert("RGB").tobytes()
    return data


def vncdo(d: Display, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "vncdo"), "-s", f"127.0.0.1::{d.port}", "-p", password,
                           *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def zrle_capture(d: Display, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", ZRLE_CAPTURE, f"127.0.0.1::{d.port}", PASSWORD,
                           str(out)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def test_two_client_libraries_capture_the_guest_picture(display: Display, tmp_path: Path) -> None:
    expected = rgb(sample_picture())

    async def scenario() -> tuple[bytes, bytes]:
        async with asyncvnc.connect("127.0.0.1", display.port, password=PASSWORD) as client:
            first = (await client.screenshot())[:, :, :3].tobytes()
            # vncdotool connects while asyncvnc stays connected
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "vncdo"), "-s", f"127.0.0.1::{display.port}", "-p", PASSWORD,
                "capture", str(tmp_path / "raw.png"), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert display.stats()["vnc"]["clients"] >= 1
            second = (await client.screenshot())[:, :, :3].tobytes()
            return first, second

    first, second = asyncio.run(scenario())
    assert first == expected and second == expected
    assert rgb(Image.open(tmp_path / "raw.png")) == expected
    out = zrle_capture(display, tmp_path / "zrle.png")
    assert out.returncode == 0, out.stderr
    assert rgb(Image.open(tmp_path / "zrle.png")) == expected
    shot = command(display.control, "screenshot", timeout=5)
    assert (shot["width"], shot["height"], shot["format"]) == (W, H, "XRGB8888")
    assert rgb(Image.frombytes("RGB", (W, H), shot["pixels"], "raw", "BGRX")) == expected


def test_password_accepted_and_refused(display: Display, tmp_path: Path) -> None:
    assert vncdo(display, "capture", str(tmp_path / "ok.png")).returncode == 0
    assert vncdo(display, "capture", str(tmp_path / "no.png"), password="wrong").returncode != 0
    assert not (tmp_path / "no.png").exists()

    async def wrong() -> None:
        async with asyncvnc.connect("127.0.0.1", display.port, password="nope"):
            pass

    with pytest.raises(PermissionError):
        asyncio.run(wrong())
    with pytest.raises(AuthRefused):
        RfbClient("127.0.0.1", display.port, password=b"bad")
    wait_for(lambda: display.stats()["vnc"]["auth_failures"] == 3, "three refusals")


def test_garbage_client_dropped_others_get_updates(display: Display, tmp_path: Path) -> None:
    with RfbClient("127.0.0.1", display.port, password=PASSWORD.encode()) as watcher:
        watcher.request()
        watcher.read_update()
        garbage = RfbClient("127.0.0.1", display.port, password=PASSWORD.encode())
        garbage.sock.sendall(b"\xfe" * 64)  # no such message type
        assert garbage.sock.recv(100) == b""
        garbage.close()
        wait_for(lambda: display.stats()["vnc"]["drop_reasons"].get("protocol error") == 1,
                 "the garbage client's drop")
        # a 10x10 square changes inside one 64x64 tile
        img = sample_picture()
        ImageDraw.Draw(img).rectangle([200, 150, 209, 159], fill=(1, 2, 3))
        display.write_picture(img)
        watcher.request(incremental=True)
        rects = watcher.read_update()
        assert [(r.x, r.y, r.width, r.height) for r in rects] == [(192, 128, 64, 64)]
        got = Image.frombytes("RGB", (W, H), bytes(watcher.screen), "raw", "BGRX")
        assert rgb(got) == rgb(img)
    assert vncdo(display, "capture", str(tmp_path / "after.png")).returncode == 0
    assert rgb(Image.open(tmp_path / "after.png")) == rgb(img)


def test_input_reaches_the_core(display: Display, core: FakeCore) -> None:
    with RfbClient("127.0.0.1", display.port, password=PASSWORD.encode()) as c:
        c.key(0xFF1B, True)
        c.key(0xFF1B, False)
        c.pointer(5, 6, 1)
        c.pointer(7, 8, 0)
        wait_for(lambda: len(core.events) >= 4, "the events at the core")
    assert core.events == [
        {"type": "key", "keysym": 0xFF1B, "down": True},
        {"type": "key", "keysym": 0xFF1B, "down": False},
        {"type": "pointer", "x": 5, "y": 6, "buttons": 1},
        {"type": "pointer", "x": 7, "y": 8, "buttons": 0},
    ]


def test_ramfb_command_checks_its_values(display: Display) -> None:
    for bad in ({"width": 0}, {"fourcc": 0x12345678}, {"stride": W * 4 - 4},
                {"width": "wide"}, {"height": 1 << 20}):
        args = {"addr": display.fb, "width": W, "height": H, "fourcc": XRGB8888,
                "stride": STRIDE, **bad}
        with pytest.raises(ControlError):
            command(display.control, "ramfb", timeout=5, **args)
    outside = command(display.control, "ramfb", timeout=5, addr=1 << 40, width=W, height=H,
                      fourcc=XRGB8888, stride=STRIDE)
    assert outside["mapped"] is False
    shot = command(display.control, "screenshot", timeout=5)
    assert shot["pixels"] == bytes(W * H * 4)  # out of guest memory: blank, still serving
    assert command(display.control, "ramfb", timeout=5, addr=0) == {"ok": True, "addr": 0}
