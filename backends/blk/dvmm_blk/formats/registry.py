"""Which format an image is, and opening it with its backing chain.

Owns format detection (``--format auto``: the magic at the start of the
file, as qemu probes; an image no header matches is raw — a fixed VHD,
whose only header is its footer, needs ``--format vpc`` as in qemu) and
the opening of backing chains: a backing file name is taken relative to
the image's directory, its format from the image (qcow2's backing format
extension) or probed, and a chain is limited in depth and may not loop.
"""

from __future__ import annotations

import fcntl
import os

from .base import BlockImage, ImageError, ImageFile, ImageUnsupported

FORMATS = ("auto", "raw", "qcow2", "vmdk", "vpc", "qed")
#: Formats dvmm reads only: opened read-only whatever was asked.
READ_ONLY_FORMATS = frozenset({"vmdk", "vpc", "qed"})
MAX_CHAIN = 16


def probe(head: bytes) -> str:
    """The format whose magic starts ``head`` (the first bytes of a file)."""
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"QED\0":
        return "qed"
    if head[:4] == b"KDMV" or head[:21] == b"# Disk DescriptorFile":
        return "vmdk"
    if head[:8] == b"conectix":
        return "vpc"
    return "raw"


def probe_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return probe(f.read(512))
    except OSError as exc:
        raise ImageError(f"cannot open image {path}: {exc.strerror}") from None


def open_image(path: str, fmt: str = "auto", read_only: bool = False, *,
               snapshot: str | None = None, lock: bool = True,
               _seen: tuple[str, ...] = ()) -> BlockImage:
    """``path`` as a :class:`BlockImage` of format ``fmt``, with its backing chain."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown image format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = probe_file(path)
    if fmt in READ_ONLY_FORMATS:
        read_only = True
    real = os.path.realpath(path)
    if real in _seen:
        raise ImageError(f"backing chain of {_seen[0]} loops back to {path}")
    if len(_seen) >= MAX_CHAIN:
        raise ImageError(f"backing chain of {_seen[0]} is deeper than {MAX_CHAIN} images")
    file = ImageFile(path, read_only)
    try:
        if lock:
            _lock(file)
        img = _open_format(file, fmt, snapshot)
    except OSError as exc:
        file.close()
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    except BaseException:
        file.close()
        raise
    try:
        _open_backing(img, (*_seen, real), lock)
    except BaseException:
        img.close()
        raise
    return img


def _lock(file: ImageFile) -> None:
    # Shared for readers, exclusive for a writer, as RawDisk does.
    mode = fcntl.LOCK_SH if file.read_only else fcntl.LOCK_EX
    try:
        fcntl.flock(file.fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ImageError(f"image {file.path} is in use by another process") from None


def _open_format(file: ImageFile, fmt: str, snapshot: str | None) -> BlockImage:
    if snapshot is not None and fmt != "qcow2":
        raise ImageUnsupported(f"{fmt} images have no snapshots")
    if fmt == "qcow2":
        from .qcow2_image import Qcow2Image

        return Qcow2Image(file, snapshot=snapshot)
    if fmt == "raw":
        from .raw import RawImage

        return RawImage(file)
    if fmt == "qed":
        from .qed import QedImage

        return QedImage(file)
    if fmt == "vmdk":
        from .vmdk import VmdkImage

        return VmdkImage(file)
    from .vpc import VpcImage

    return VpcImage(file)


def _open_backing(img: BlockImage, seen: tuple[str, ...], lock: bool) -> None:
    name = img.backing_name
    if not name:
        return
    base = os.path.dirname(os.path.realpath(img.path))  # also for /proc/self/fd/N
    path = name if os.path.isabs(name) else os.path.join(base, name)
    fmt = img.backing_format or "auto"
    if fmt not in FORMATS:
        raise ImageUnsupported(f"backing file {name} has an unknown format {fmt!r}")
    try:
        img.backing = open_image(path, fmt, True, lock=lock, _seen=seen)
    except ImageError as exc:
        raise ImageError(f"backing file of {img.path}: {exc}") from None
