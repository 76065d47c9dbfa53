"""The uncompressed kernel (``vmlinux``) that QEMU can boot through PVH.

Owns unpacking a bzImage's payload and checking the ELF for the PVH entry
note.  Why: under TCG the bzImage's own xz decompressor takes ~2.5 s of a
~5.5 s boot; QEMU's ``-kernel vmlinux`` with the ``XEN_ELFNOTE_PHYS32_ENTRY``
note enters the kernel directly (``pvh.bin``), so the guest is up in ~2.8 s.
The bzImage stays the artifact for VMMs that speak the Linux boot protocol.

Layout (Linux ``Documentation/x86/boot.rst``): the protected-mode part starts
at ``(setup_sects + 1) * 512``; header fields ``payload_offset`` (0x248) and
``payload_length`` (0x24c) locate the compressed vmlinux inside it.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from pathlib import Path

from dvmm_core.guest.debian import GuestBuildError

_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF image compressed inside *bzimage* (xz or gzip payloads)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise GuestBuildError("kernel is not a bzImage (no HdrS header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    # Both decoders stop at the end of the stream: the kernel appends the
    # uncompressed size after it.
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)
    raise GuestBuildError(f"unsupported kernel compression (magic {payload[:4].hex()})")


def has_pvh_note(elf: bytes) -> bool:
    """True if the ELF64 image carries ``Xen`` note 18 (the PVH 32-bit entry)."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type == _PT_NOTE and _notes_have_pvh(elf[p_offset : p_offset + p_filesz]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + _align4(namesz) + _align4(descsz)
    return False


def _align4(n: int) -> int:
    return (n + 3) & ~3


def make_vmlinux(bzimage: Path, dest: Path) -> None:
    """Write the PVH-bootable vmlinux of *bzimage* to *dest* (atomically)."""
    try:
        elf = extract_vmlinux(bzimage.read_bytes())
    except (lzma.LZMAError, zlib.error, struct.error) as exc:
        raise GuestBuildError(f"cannot decompress {bzimage}: {exc}") from None
    if not has_pvh_note(elf):
        raise GuestBuildError("kernel has no PVH entry note (CONFIG_PVH)")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, dest)
