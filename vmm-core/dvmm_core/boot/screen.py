"""The screen disk: a boot program that draws a fixed picture through int 10h.

``screen_boot.S`` (next to this module) is the display workload of the core
tier: SeaBIOS boots it, it clears the screen (text mode 3), writes a few
coloured lines with int 10h AH=13h, moves the cursor, reports
``dvmm-screen: drawn`` on COM1 and halts.  The picture depends only on the
firmware and its VGA BIOS, so the dvmm core and QEMU with the same ramfb VGA
BIOS must show the same pixels.  This module writes such a disk
(:func:`make_screen_disk`) and lists the text the program draws
(:data:`SCREEN_TEXT`, row -> (column, text)) for tests that look at the
rows it occupies.
"""

from __future__ import annotations

from pathlib import Path

from .demo import IMAGE_ALIGN, assemble_boot_sector

SOURCE_NAME = "screen_boot.S"
MAGIC = b"DVMS"
BOOTED = "dvmm-screen: booted"
DRAWN = "dvmm-screen: drawn"

#: What the program writes: row -> [(column, text)], as in ``screen_boot.S``.
SCREEN_TEXT: dict[int, list[tuple[int, str]]] = {
    1: [(2, " dvmm display test: text drawn through BIOS int 10h ")],
    3: [(2, "The quick brown fox jumps over the lazy dog. 0123456789")],
    4: [(2, "LAZY DOG! @#$%^&*()[]{}<>")],
    6: [(2, " white on red "), (18, " green on green "), (36, " black on grey ")],
    20: [(60, "bottom right")],
}


def make_screen_disk(path: Path) -> Path:
    """A bootable image: the boot sector, zero-padded to a whole MiB (SeaBIOS
    needs at least one cylinder of its CHS translation)."""
    sector = assemble_boot_sector(name=SOURCE_NAME, magic=MAGIC)
    path.write_bytes(sector + bytes(IMAGE_ALIGN - len(sector)))
    return path
