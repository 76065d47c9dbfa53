"""The display process's own control-plane commands (``--control``).

Owns ``ramfb`` and ``screenshot`` (the display interface agreed with the
core) and the display's part of ``stats``; the standard backend commands
(health, stats, shutdown, fault) are :mod:`dvmm_shared.vhost_user.control_host`'s.

* ``ramfb addr= width= height= fourcc= stride=`` — scan out guest RAM at
  ``addr`` (``addr=0``: no framebuffer, a blank screen).  Every value is
  checked (:class:`ScanoutConfig`); a bad one gets an error reply and the
  screen stays as it was.
* ``resize width= height=`` — the display size virtio-gpu offers (as
  ``--size``), announced to a running driver with the config event.
* ``screenshot [y= rows=] [compress=true]`` — ``{"width", "height",
  "format": "XRGB8888", "pixels", "y", "rows", "compressed"}``.  The control
  plane refuses messages over 1 MiB (:data:`dvmm_shared.control.MAX_MESSAGE`),
  so a frame larger than that is sent zlib-compressed (``compressed`` true)
  when that fits, and otherwise a band of rows must be asked for.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict
from typing import Any

from dvmm_shared.control import MAX_MESSAGE, CommandServer, ControlError

from .device import GpuDevice
from .framebuffer import MAX_DIMENSION, FrameSource, ScanoutConfig, ScanoutError, ScanoutSource
from .input import InputForwarder
from .input_device import InputDevice
from .server import VncServer

#: Room left in a reply for the other fields and msgpack framing.
MAX_PIXELS_REPLY = MAX_MESSAGE - 4096


def _int(req: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ControlError(f"{key} must be an integer {lo}..{hi}")
    return value


class DisplayCommands:
    """Handlers added to the backend's :class:`CommandServer`."""

    def __init__(self, scanout: ScanoutSource, server: VncServer, device: GpuDevice,
                 forwarder: InputForwarder,
                 inputs: dict[str, InputDevice] | None = None) -> None:
        self.scanout = scanout
        self.server = server
        self.device = device
        self.forwarder = forwarder
        self.inputs = inputs if inputs is not None else {}

    def install(self, commands: CommandServer) -> None:
        # Handlers are looked up per request, so adding them after start is safe.
        commands.handlers["ramfb"] = self.ramfb
        commands.handlers["screenshot"] = self.screenshot
        commands.handlers["resize"] = self.resize

    def ramfb(self, req: dict[str, Any]) -> dict[str, Any]:
        addr = _int(req, "addr", 0, (1 << 64) - 1)
        if addr == 0:
            self.scanout.configure(None)
            self.server.wake()
            return {"addr": 0}
        try:
            cfg = ScanoutConfig(addr, _int(req, "width", 0, 1 << 32),
                                _int(req, "height", 0, 1 << 32),
                                _int(req, "fourcc", 0, (1 << 32) - 1),
                                _int(req, "stride", 0, 1 << 32))
        except ScanoutError as exc:
            raise ControlError(f"ramfb: {exc}") from None
        self.scanout.configure(cfg)
        self.server.wake()
        return {**asdict(cfg), "mapped": self.scanout.readable()}

    def screenshot(self, req: dict[str, Any]) -> dict[str, Any]:
        return screenshot(self.server.source, req)

    def resize(self, req: dict[str, Any]) -> dict[str, Any]:
        width = _int(req, "width", 1, MAX_DIMENSION)
        height = _int(req, "height", 1, MAX_DIMENSION)
        call_soon = self.device.call_soon
        if call_soon is None:
            raise ControlError("resize: the device is not serving yet")
        call_soon(lambda: self.device.set_display_size(width, height))
        return {"width": width, "height": height, "driver": self.device.driver_ready}

    def _gpu_socket(self) -> dict[str, Any]:
        channel = self.device.gpu_socket
        if channel is None:
            return _no_socket()
        return {"state": channel.state.value, **asdict(channel.stats)}

    def stats(self) -> dict[str, Any]:
        """The device part of the ``stats`` reply."""
        host, port = self.server.address
        cfg = self.scanout.config
        return {
            "gpu": {**asdict(self.device.stats), "resources": len(self.device.table.resources),
                    "display": list(self.device.table.modes()[0] or ()),
                    "events_read": self.device.events_read,
                    "restores": self.device.recovery.restores,
                    "resource_bytes": self.device.table.used,
                    "scanout": self.device.table.presented() is not None},
            "gpu_socket": self._gpu_socket(),
            "vnc": {"host": host, "port": port, "clients": len(self.server.clients),
                    **asdict(self.server.stats)},
            "input": asdict(self.forwarder.stats),
            "virtio_input": {kind: {**asdict(dev.stats), "active": dev.active,
                                    "pending": dev.pending()}
                             for kind, dev in self.inputs.items()},
            "scanout": {**(asdict(cfg) if cfg else {"addr": 0}),
                        "read_errors": self.scanout.read_errors},
        }


def _no_socket() -> dict[str, Any]:
    return {"state": "none"}


def screenshot(source: FrameSource, req: dict[str, Any]) -> dict[str, Any]:
    frame = source.snapshot()
    y = _int(req, "y", 0, frame.height - 1, 0)
    rows = _int(req, "rows", 1, frame.height - y, frame.height - y)
    compress = req.get("compress", False)
    if not isinstance(compress, bool):
        raise ControlError("compress must be true or false")
    stride = frame.width * 4
    pixels = frame.pixels[y * stride:(y + rows) * stride]
    if compress or len(pixels) > MAX_PIXELS_REPLY:
        packed = zlib.compress(pixels, 1)
        if len(packed) > MAX_PIXELS_REPLY:
            raise ControlError(f"screenshot of {len(pixels)} bytes does not fit a control "
                               f"message even compressed: ask for fewer rows (y=, rows=)")
        pixels, compress = packed, True
    return {"width": frame.width, "height": frame.height, "format": "XRGB8888",
            "y": y, "rows": rows, "compressed": compress, "pixels": pixels}
