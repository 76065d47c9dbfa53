"""A minimal EDID 1.4 base block for GET_EDID (virtio 1.2 5.7.6.8, VESA E-EDID).

Owns the 128 bytes a driver reads to learn the display's preferred mode:
the fixed header, a "DVM" manufacturer id, digital input, sRGB, one
detailed timing descriptor for the preferred size at 60 Hz (blanking
intervals in the style of CVT reduced blanking), a monitor name and the
checksum.  Sizes beyond what a detailed timing can carry (12 bits) are
clamped.
"""

from __future__ import annotations

import struct

HEADER = b"\x00\xff\xff\xff\xff\xff\xff\x00"
MANUFACTURER = (4 << 10) | (22 << 5) | 13  # "DVM": letters as 5-bit values, A = 1
SRGB_CHROMATICITY = bytes.fromhex("ee91a3544c99260f5054")
H_BLANK, H_FRONT, H_SYNC = 160, 48, 32  # CVT reduced blanking
V_BLANK, V_FRONT, V_SYNC = 30, 3, 6
MAX_ACTIVE = 4095
MM_PER_PIXEL = 0.264  # about 96 dpi, for the image size fields


def detailed_timing(width: int, height: int, refresh: int = 60) -> bytes:
    w, h = min(width, MAX_ACTIVE), min(height, MAX_ACTIVE)
    clock = min(0xFFFF, (w + H_BLANK) * (h + V_BLANK) * refresh // 10_000)
    wmm, hmm = min(4095, int(w * MM_PER_PIXEL)), min(4095, int(h * MM_PER_PIXEL))
    return struct.pack(
        "<H16B", clock,
        w & 0xFF, H_BLANK & 0xFF, (w >> 8) << 4 | H_BLANK >> 8,
        h & 0xFF, V_BLANK & 0xFF, (h >> 8) << 4 | V_BLANK >> 8,
        H_FRONT & 0xFF, H_SYNC & 0xFF, (V_FRONT & 0xF) << 4 | (V_SYNC & 0xF),
        (H_FRONT >> 8) << 6 | (H_SYNC >> 8) << 4 | (V_FRONT >> 4) << 2 | V_SYNC >> 4,
        wmm & 0xFF, hmm & 0xFF, (wmm >> 8) << 4 | hmm >> 8,
        0, 0, 0x1E)  # no border; digital separate sync, +hsync +vsync


def _text_descriptor(tag: int, text: str) -> bytes:
    body = (text.encode()[:12] + b"\n").ljust(13, b" ")
    return bytes([0, 0, 0, tag, 0]) + body


def build_edid(width: int, height: int, name: str = "dvmm") -> bytes:
    """The 128-byte base block whose preferred mode is ``width`` x ``height``."""
    block = (HEADER + struct.pack(">H", MANUFACTURER) + struct.pack("<HIBB", 1, 0, 1, 36)
             + bytes([1, 4])  # EDID version 1.4
             + bytes([0x80, min(255, width // 38), min(255, height // 38), 120, 0x06])
             + SRGB_CHROMATICITY + bytes(3) + b"\x01\x01" * 8
             + detailed_timing(width, height) + _text_descriptor(0xFC, name)
             + bytes([0, 0, 0, 0x10]) + bytes(14) + bytes([0, 0, 0, 0x10]) + bytes(14)
             + b"\x00")  # no extension blocks
    return block + bytes([-sum(block) & 0xFF])


def preferred_mode(edid: bytes) -> tuple[int, int]:
    """The active size of the first detailed timing (for tests and tools)."""
    d = edid[54:72]
    return d[2] | (d[4] >> 4) << 8, d[5] | (d[7] >> 4) << 8
