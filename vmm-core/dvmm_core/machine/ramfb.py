"""ramfb: the firmware's framebuffer in guest RAM, as QEMU's ``-device ramfb``.

Owns the guest-facing half of the simplest display there is: two fw_cfg
files and the check of what the guest writes into one of them.

* ``vgaroms/vgabios-ramfb.bin`` -- SeaBIOS's VGA BIOS for ramfb (Debian's
  ``/usr/share/seabios/vgabios-ramfb.bin``).  SeaBIOS runs ``vgaroms/*``
  as VGA option ROMs (src/optionroms.c, vgarom_setup); this one allocates
  the framebuffer in high memory, draws int 10h text into it, and tells
  the VMM where it is (SeaBIOS vgasrc/ramfb.c, notes/seabios.md section 6).
* ``etc/ramfb`` -- a writable 28-byte file, the big-endian ``struct
  RAMFBCfg { u64 addr; u32 fourcc; u32 flags; u32 width; u32 height; u32
  stride; }`` (QEMU hw/display/ramfb.c).  The guest fills it with one fw_cfg
  DMA write (control = key << 16 | SELECT | WRITE); ``FwCfg`` calls
  :meth:`Ramfb.on_write` with the whole file, on the vCPU thread.

A write is hostile input (:func:`parse_ramfb_config`): the size must be
one QEMU accepts (16..16000 x 16..12000, as VBE_DISPI_MAX_XRES/YRES), the
format XRGB8888 (``XR24``, all SeaBIOS writes), the stride at least a row,
and the whole framebuffer inside one guest RAM region -- the display
process maps guest RAM and scans it out from there, so a framebuffer
partly outside RAM would make it read what is not guest memory.  An
address of 0 turns the display off (blank), as the display interface
defines.  A bad write is logged (once per kind) and changes nothing.

It does not talk to the display process: a valid configuration goes to
``on_config``, which must not block (``display.DisplayLink`` sends it from
its own thread).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dvmm_shared.memory import GuestMemory, GuestMemoryError

from .fw_cfg import FwCfg
from .platform import LogOnce

log = logging.getLogger("dvmm.ramfb")

RAMFB_FILE = "etc/ramfb"
VGA_ROM_FILE = "vgaroms/vgabios-ramfb.bin"
VGABIOS_RAMFB = "/usr/share/seabios/vgabios-ramfb.bin"
RAMFB_CFG = struct.Struct(">QIIIII")  # addr, fourcc, flags, width, height, stride
DRM_FORMAT_XRGB8888 = 0x34325258  # fourcc "XR24" (drm_fourcc.h)
BYTES_PER_PIXEL = 4
MIN_SIZE = 16
MAX_WIDTH, MAX_HEIGHT = 16000, 12000  # QEMU's VBE_DISPI_MAX_XRES / _YRES


class RamfbError(ValueError):
    """A ramfb configuration the display must not use."""


@dataclass(frozen=True)
class RamfbConfig:
    """A checked configuration; ``addr == 0`` is "no framebuffer"."""

    addr: int
    fourcc: int
    width: int
    height: int
    stride: int

    @property
    def size(self) -> int:
        return self.stride * self.height

    def command_args(self) -> dict[str, Any]:
        """The arguments of the display's ``ramfb`` command."""
        return asdict(self)


BLANK = RamfbConfig(0, DRM_FORMAT_XRGB8888, 0, 0, 0)


def parse_ramfb_config(data: bytes, mem: GuestMemory) -> RamfbConfig:
    """The guest's RAMFBCfg, checked; raises :class:`RamfbError`."""
    if len(data) != RAMFB_CFG.size:
        raise RamfbError(f"config is {len(data)} bytes, not {RAMFB_CFG.size}")
    addr, fourcc, _flags, width, height, stride = RAMFB_CFG.unpack(data)
    if addr == 0:
        return BLANK
    if fourcc != DRM_FORMAT_XRGB8888:
        raise RamfbError(f"format {_fourcc_name(fourcc)} is not XRGB8888")
    if not (MIN_SIZE <= width <= MAX_WIDTH and MIN_SIZE <= height <= MAX_HEIGHT):
        raise RamfbError(f"size {width}x{height} is outside {MIN_SIZE}x{MIN_SIZE}.."
                         f"{MAX_WIDTH}x{MAX_HEIGHT}")
    row = width * BYTES_PER_PIXEL
    stride = stride or row  # 0: rows are packed (QEMU)
    if not row <= stride <= MAX_WIDTH * BYTES_PER_PIXEL * 2 or stride % BYTES_PER_PIXEL:
        raise RamfbError(f"stride {stride} does not fit rows of {row} bytes")
    config = RamfbConfig(addr, fourcc, width, height, stride)
    try:
        mem.slice(addr, config.size)
    except GuestMemoryError:
        raise RamfbError(f"framebuffer {addr:#x}+{config.size:#x} is not inside guest RAM"
                         ) from None
    return config


def _fourcc_name(fourcc: int) -> str:
    text = fourcc.to_bytes(4, "little")
    shown = text.decode("ascii") if all(0x20 <= b < 0x7F for b in text) else "?"
    return f"{fourcc:#010x} ({shown!r})"


class Ramfb:
    """The two fw_cfg files, and the last valid configuration the guest wrote."""

    def __init__(self, mem: GuestMemory, on_config: Callable[[RamfbConfig], None]) -> None:
        self._mem = mem
        self._on_config = on_config
        self._warn = LogOnce(log)
        self.config: RamfbConfig | None = None  # None: the guest has written nothing valid
        self.rejected = 0

    def attach(self, fw: FwCfg, rom: bytes) -> None:
        """Add ``etc/ramfb`` (writable, zeroed) and the VGA BIOS."""
        fw.add_file(VGA_ROM_FILE, rom)
        fw.add_file(RAMFB_FILE, bytes(RAMFB_CFG.size), writable=True, on_write=self.on_write)

    def on_write(self, data: bytes) -> None:
        """fw_cfg DMA wrote ``etc/ramfb`` (vCPU thread): check, remember, pass on."""
        try:
            config = parse_ramfb_config(data, self._mem)
        except RamfbError as exc:
            self.rejected += 1
            self._warn.warn(str(exc)[:40], "ramfb: guest config refused: %s", exc)
            return
        self.config = config
        log.info("ramfb: %dx%d stride %d at %#x", config.width, config.height, config.stride,
                 config.addr)
        self._on_config(config)


def load_vga_rom(path: str = VGABIOS_RAMFB) -> bytes:
    """The ramfb VGA BIOS; raises OSError if it cannot be read, ValueError
    if it is not an option ROM (no 0x55AA signature)."""
    with open(path, "rb") as f:
        rom = f.read()
    if len(rom) < 512 or rom[:2] != b"\x55\xaa":
        raise ValueError(f"{path} is not an option ROM")
    return rom
