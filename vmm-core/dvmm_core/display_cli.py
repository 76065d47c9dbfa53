"""``dvmm display screenshot``: a running VM's screen as a PNG, through the control plane.

Owns only the client side: the VM is found as ``dvmm status`` finds it
(:func:`.control_cli.find_vm`), the display backend's endpoint comes from
the core's ``status`` (``backends[].control`` of ``display0``), and the
picture from that endpoint's ``screenshot`` command
(:mod:`dvmm_display.commands`).  A frame too big for one control message
(:data:`dvmm_shared.control.MAX_MESSAGE`) arrives zlib-compressed, or is
asked for in bands of rows; the rows are packed XRGB8888 (bytes B, G, R, X),
which Pillow turns into RGB as its raw decoder ``BGRX``.
"""

from __future__ import annotations

import argparse
import zlib
from typing import Any

from dvmm_shared.cli import UsageError

from .control_cli import VmDir, add_vm_args, ask, find_vm

DISPLAY = "display0"
#: Rows per band once a whole frame does not fit one reply (1024 rows of 1024
#: XRGB pixels = 4 MiB raw; 64 rows = 256 KiB, well under the 1 MiB limit).
BAND_ROWS = 64


def display_endpoint(vm: VmDir, name: str = DISPLAY) -> str:
    """The display backend's control endpoint, as the core's ``status`` reports it."""
    backends = [b for b in ask(vm.core, "status").get("backends", []) if isinstance(b, dict)]
    match = [b for b in backends if b.get("name") == name]
    if not match:
        raise UsageError(f"VM {vm.path} has no display (no backend {name!r}; "
                         f"start it with dvmm run --display vnc=HOST:PORT)")
    control = match[0].get("control")
    if not isinstance(control, str) or not match[0].get("pid"):
        raise UsageError(f"the display backend {name!r} of VM {vm.path} is not running")
    return control


def _rows(reply: dict[str, Any]) -> bytes:
    pixels = reply.get("pixels")
    if not isinstance(pixels, bytes):
        raise UsageError("the display sent a screenshot without pixels")
    if reply.get("compressed"):
        try:
            pixels = zlib.decompress(pixels)
        except zlib.error as exc:
            raise UsageError(f"the display sent a corrupt screenshot: {exc}") from None
    return pixels


def _size(reply: dict[str, Any]) -> tuple[int, int]:
    width, height = reply.get("width"), reply.get("height")
    if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
        raise UsageError(f"the display sent a screenshot of size {width}x{height}")
    if reply.get("format") != "XRGB8888":
        raise UsageError(f"the display sent an unknown pixel format {reply.get('format')!r}")
    return width, height


def fetch_frame(endpoint: str) -> tuple[int, int, bytes]:
    """(width, height, packed XRGB8888 rows) of the display's current frame."""
    try:
        whole = ask(endpoint, "screenshot", timeout=10.0)
        width, height = _size(whole)
        data = _rows(whole)
    except UsageError as exc:
        if "fewer rows" not in str(exc):
            raise
        width, height, data = _banded(endpoint)
    if len(data) != width * height * 4:
        raise UsageError(f"the display sent {len(data)} bytes for {width}x{height} pixels")
    return width, height, data


def _banded(endpoint: str) -> tuple[int, int, bytes]:
    """The frame in bands of :data:`BAND_ROWS` rows (too big for one reply)."""
    width, height = _size(ask(endpoint, "screenshot", timeout=10.0, y=0, rows=1))
    bands, y = [], 0
    while y < height:
        band = ask(endpoint, "screenshot", timeout=10.0, y=y, rows=min(BAND_ROWS, height - y))
        if _size(band) != (width, height):
            raise UsageError("the display changed size during the screenshot; try again")
        rows = band.get("rows")
        if not isinstance(rows, int) or rows < 1:
            raise UsageError("the display sent an empty band")
        bands.append(_rows(band))
        y += rows
    return width, height, b"".join(bands)


def run_screenshot(args: argparse.Namespace) -> int:
    from PIL import Image  # only this command needs Pillow

    vm = find_vm(args.vm, args.pid)
    width, height, data = fetch_frame(display_endpoint(vm, args.name))
    image = Image.frombytes("RGB", (width, height), data, "raw", "BGRX")
    try:
        image.save(args.out, format="PNG")
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"{args.out}: {width}x{height}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``dvmm display`` (``screenshot``) on the ``dvmm`` command."""
    p = sub.add_parser("display", help="a running VM's display (screenshot)",
                       description="Talk to a running VM's display process.")
    kinds = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = kinds.add_parser("screenshot", help="save the screen as a PNG",
                         description="Ask the VM's display process for its current frame "
                         "(what a VNC client sees) and write it as a PNG file.")
    add_vm_args(s)
    s.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    s.add_argument("--name", default=DISPLAY, help=f"the display backend (default {DISPLAY})")
    s.set_defaults(func=run_screenshot)
