"""``dvmm display screenshot`` against real control endpoints: a stand-in core
answering ``status`` and the display's own ``screenshot`` handler
(:func:`dvmm_display.commands.screenshot`) serving a frame the test made --
small (raw), large but compressible (zlib) and large noise (bands of rows)."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dvmm_core import cli
from dvmm_display.commands import screenshot
from dvmm_display.framebuffer import Frame
from dvmm_shared.control import CommandServer, runtime_endpoint
from PIL import Image


class Served:
    """A stand-in core and display in a runtime directory; ``frame`` is what
    the display shows, ``calls`` the screenshot requests it got."""

    def __init__(self, vm_dir: Path, display: bool = True) -> None:
        self.frame = Frame.blank(8, 8)
        self.calls: list[dict[str, Any]] = []
        backends = []
        self.servers = []
        if display:
            control = runtime_endpoint(str(vm_dir), "display0")
            backends.append({"name": "display0", "pid": os.getpid(), "control": control})
            self.servers.append(CommandServer(control, {"screenshot": self._shot}))
        self.servers.append(CommandServer(runtime_endpoint(str(vm_dir), "core"),
                                          {"status": lambda req: {"backends": backends}}))
        for s in self.servers:
            s.start()

    def snapshot(self) -> Frame:
        return self.frame

    def _shot(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(req)
        return screenshot(self, req)

    def close(self) -> None:
        for s in self.servers:
            s.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


def picture(width: int, height: int, noise: bool) -> tuple[Frame, Image.Image]:
    """A frame (B, G, R, X bytes) and the RGB image it must become."""
    rng = random.Random(width * height)
    if noise:
        rgb = rng.randbytes(width * height * 3)
    else:
        rgb = bytes(v for y in range(height) for x in range(width)
                    for v in (x & 0xFF, y & 0xFF, (x ^ y) & 0xFF))
    xrgb = bytearray(width * height * 4)
    xrgb[0::4], xrgb[1::4], xrgb[2::4] = rgb[2::3], rgb[1::3], rgb[0::3]
    xrgb[3::4] = bytes([0xAA]) * (width * height)  # X: must be ignored
    return Frame(width, height, bytes(xrgb)), Image.frombytes("RGB", (width, height), rgb)


@pytest.mark.parametrize(("width", "height", "noise", "how"), [
    (64, 48, True, "raw"), (1024, 768, False, "compressed"), (1024, 768, True, "bands")])
def test_screenshot_writes_the_displayed_frame(tmp_path: Path, served: Served, width: int,
                                               height: int, noise: bool, how: str) -> None:
    served.frame, expected = picture(width, height, noise)
    out = tmp_path / "shot.png"
    assert cli.main(["display", "screenshot", "--vm", str(tmp_path), "--out", str(out)]) == 0
    got = Image.open(out)
    assert got.format == "PNG" and got.size == (width, height)
    assert got.convert("RGB").tobytes() == expected.tobytes()
    banded = [c for c in served.calls if "rows" in c]
    assert bool(banded) == (how == "bands")
    if how == "bands":  # every row asked for once, in order
        spans = [(c["y"], c["rows"]) for c in banded[1:]]
        assert spans[0][0] == 0 and sum(r for _, r in spans) == height
        assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_no_display_is_a_one_line_error(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    s = Served(tmp_path, display=False)
    try:
        rc = cli.main(["display", "screenshot", "--vm", str(tmp_path),
                       "--out", str(tmp_path / "x.png")])
    finally:
        s.close()
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no display" in err
    assert not (tmp_path / "x.png").exists()


def test_no_vm_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["display", "screenshot", "--vm", str(tmp_path / "none"), "--out", "x.png"])
    assert rc != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no VM runtime directory" in err

