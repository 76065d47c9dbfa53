"""The display workload's oracle under the core: the screen equals what the guest drew.

Under ``dvmm run --display vnc=HOST:PORT`` SeaBIOS runs the ramfb VGA BIOS,
which draws the guest's int 10h text into a framebuffer in guest RAM; the
display process (``display0``) maps the core's RAM memfd and scans that
framebuffer out over VNC.  The oracle compares two independent readings:

* what a VNC client sees — a fresh whole-screen capture with dvmm's own
  RFB client (:mod:`.rfb_capture`), so the display's server, scanout and
  ramfb configuration are all on the path;
* what the guest drew — the framebuffer read straight from guest RAM, the
  core's memfd opened through ``/proc/CORE_PID/fd`` and cut into guest
  addresses by the core's own :class:`~dvmm_core.machine.e820.RamLayout`.

Where the framebuffer lies (address, size, stride, format) is pinned once,
before any fault (:meth:`DisplayOracle.start`), from the display's
``stats`` (``device.scanout``: the configuration the core sent it).  After a
restart the display must scan out that same framebuffer again (the core
resends it on ``device-restored``), so :meth:`DisplayOracle.check` also
fails when the display's configuration differs from the pinned one.  The
guest may draw while the oracle looks (the VGA BIOS's software cursor
blinks on timer ticks), so a capture counts only when guest RAM read
before and after it is the same; the X byte of XRGB8888 is padding (RFC
6143 7.4: undefined bits) and is not compared.

:meth:`DisplayOracle.completions` moves with every successful cheap probe
(a 16x16 update over VNC) while the display shows the guest's framebuffer:
the "frames scanned out" counter a campaign times recovery by.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from dvmm_shared.control import ControlError

from ..machine.e820 import RamLayout
from .rfb_capture import Capture, CaptureError, capture
from .vmbase import VmError

RAM_NAME = "/memfd:dvmm-ram"
XRGB_FORMATS = (0x34325258, 0x34325241)  # "XR24", "AR24": bytes B G R X|A
PROBE = (16, 16)             # the completions probe: a tiny update, the same path
PROBE_INTERVAL = 0.1         # at most one probe per this many seconds
PROBE_TIMEOUT = 1.0          # a stopped display must not stall the campaign loop long
STABLE_TRIES = 10            # captures tried while the guest keeps drawing

Stats = Callable[[], dict[str, Any]]


class OracleError(RuntimeError):
    """The oracle could not start: no framebuffer configured, RAM not found."""


@dataclass(frozen=True)
class Framebuffer:
    """Where the guest's framebuffer lies (the display's ``scanout`` stats)."""

    addr: int
    width: int
    height: int
    fourcc: int
    stride: int

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Framebuffer | None:
        """The configuration in a display ``stats`` reply (None: no framebuffer)."""
        s = stats.get("device", {}).get("scanout", {})
        if not isinstance(s, dict) or not s.get("addr"):
            return None
        try:
            fb = cls(*(int(s[k]) for k in ("addr", "width", "height", "fourcc", "stride")))
        except (KeyError, TypeError, ValueError):
            return None
        return fb if fb.width > 0 and fb.height > 0 and fb.stride >= fb.width * 4 else None


def masked(pixels: bytes) -> bytes:
    """XRGB8888 pixels with every X (padding) byte zeroed."""
    out = bytearray(pixels)
    out[3::4] = bytes(len(out) // 4)
    return bytes(out)


def difference(expected: bytes, got: Capture, width: int, height: int) -> str | None:
    """Why ``got`` is not the ``width`` x ``height`` picture ``expected`` (None: it is)."""
    if (got.width, got.height) != (width, height):
        return f"the display shows {got.width}x{got.height}, the guest drew {width}x{height}"
    seen = masked(got.pixels)
    if seen == expected:
        return None
    row = width * 4
    rows = [y for y in range(height) if seen[y * row:(y + 1) * row] != expected[y * row:(y + 1)
                                                                                   * row]]
    y = rows[0]
    x = next(i for i in range(width)
             if seen[y * row + i * 4:y * row + i * 4 + 4]
             != expected[y * row + i * 4:y * row + i * 4 + 4])
    at = y * row + x * 4
    return (f"the display's picture differs from guest RAM in {len(rows)} rows "
            f"({rows[0]}..{rows[-1]}); first at ({x},{y}): "
            f"{seen[at:at + 3].hex()} != {expected[at:at + 3].hex()} (BGR)")


class GuestRam:
    """The core's guest RAM memfd, mapped read-only through ``/proc/PID/fd``."""

    def __init__(self, core_pid: int) -> None:
        fd = _open_ram(core_pid)
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.layout = RamLayout(size)

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at guest-physical ``addr`` (inside one RAM chunk)."""
        for chunk in self.layout.chunks:
            if chunk.guest_addr <= addr and addr + size <= chunk.guest_addr + chunk.size:
                off = chunk.fd_offset + addr - chunk.guest_addr
                return self._map[off:off + size]
        raise OracleError(f"{addr:#x}+{size:#x} is not inside guest RAM")

    def framebuffer(self, fb: Framebuffer) -> bytes:
        """The framebuffer's rows, packed, X bytes zeroed."""
        row = fb.width * 4
        whole = self.read(fb.addr, fb.stride * (fb.height - 1) + row)
        if fb.stride != row:
            whole = b"".join(whole[y * fb.stride:y * fb.stride + row] for y in range(fb.height))
        return masked(whole)

    def close(self) -> None:
        self._map.close()


def _open_ram(pid: int) -> int:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        raise OracleError(f"cannot list the core's fds: {exc.strerror}") from None
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith(RAM_NAME):
                return os.open(path, os.O_RDONLY)
        except OSError:
            continue
    raise OracleError(f"the core (pid {pid}) has no {RAM_NAME} memfd")


class DisplayOracle:
    """The screen of ``display0`` against guest RAM (a context manager).

    ``stats`` returns the display backend's ``stats`` reply (raising
    :class:`ControlError` or :class:`VmError` while it restarts or hangs:
    ``ChaosVm.backend_stats`` with the target bound fits); ``vnc`` is where
    its VNC server listens (default: the ``device.vnc`` host and port of the
    first stats reply)."""

    def __init__(self, core_pid: int, stats: Stats, vnc: tuple[str, int] | None = None
                 ) -> None:
        self.core_pid, self._stats, self.vnc = core_pid, stats, vnc
        self.fb: Framebuffer | None = None
        self.ram: GuestRam | None = None
        self.expected: bytes | None = None   # tests: check against this instead of RAM
        self.captures = 0
        self._count = 0
        self._last_probe = 0.0

    def __enter__(self) -> DisplayOracle:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> Framebuffer:
        """Wait for the display to scan out the guest's framebuffer; pin it.
        Raises :class:`OracleError` if it does not within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = self._stats()
                fb = Framebuffer.from_stats(stats)
            except (ControlError, VmError):
                fb, stats = None, {}
            if fb is not None:
                break
            if time.monotonic() > deadline:
                raise OracleError(f"the display showed no guest framebuffer in {timeout:.0f} s")
            time.sleep(0.05)
        if fb.fourcc not in XRGB_FORMATS:
            raise OracleError(f"framebuffer format {fb.fourcc:#010x} is not XRGB8888")
        if self.vnc is None:
            vnc = stats.get("device", {}).get("vnc", {})
            self.vnc = (str(vnc.get("host", "127.0.0.1")), int(vnc.get("port", 0)))
        self.ram = GuestRam(self.core_pid)
        self.ram.framebuffer(fb)  # inside guest RAM, or OracleError now
        self.fb = fb
        return fb

    def close(self) -> None:
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    def _shown(self) -> Framebuffer | None:
        """The display's current configuration (None: unreachable or none)."""
        try:
            return Framebuffer.from_stats(self._stats())
        except (ControlError, VmError):
            return None

    def completions(self) -> int:
        """Probes the display answered with the guest's screen: grows while it
        serves frames, stands still while it is down, hung or blank."""
        now = time.monotonic()
        if self.fb is None or self.vnc is None or now - self._last_probe < PROBE_INTERVAL:
            return self._count
        self._last_probe = now
        if self._shown() != self.fb:
            return self._count
        try:
            probe = capture(*self.vnc, PROBE_TIMEOUT, region=PROBE)
        except CaptureError:
            return self._count
        if (probe.width, probe.height) == (self.fb.width, self.fb.height):
            self._count += 1
        return self._count

    def check(self) -> str | None:
        """None when a fresh VNC capture equals the framebuffer in guest RAM
        (or :attr:`expected`); else why not, in one line."""
        fb, ram = self.fb, self.ram
        if fb is None or ram is None or self.vnc is None:
            return "the display oracle was not started"
        shown = self._shown()
        if shown != fb:
            return f"the display scans out {shown}, not the guest's {fb}"
        for _ in range(STABLE_TRIES):
            before = ram.framebuffer(fb)
            try:
                got = capture(*self.vnc)
            except CaptureError as exc:
                return f"no VNC capture: {exc}"
            self.captures += 1
            if self.expected is not None:
                return difference(self.expected, got, fb.width, fb.height)
            if ram.framebuffer(fb) == before:  # the guest did not draw meanwhile
                return difference(before, got, fb.width, fb.height)
        return f"the guest kept drawing through {STABLE_TRIES} captures"


def altered(frame: bytes, pixels: int = 1) -> bytes:
    """``frame`` with ``pixels`` pixels inverted, spread over it (a negative
    test's :attr:`DisplayOracle.expected`)."""
    out = bytearray(frame)
    count = len(out) // 4
    for i in range(pixels):
        at = (i * count // pixels + count // 3) % count * 4
        out[at:at + 3] = bytes(255 - b for b in out[at:at + 3])
    return bytes(out)
