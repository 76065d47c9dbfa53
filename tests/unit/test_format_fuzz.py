"""Hostile images: fuzzed headers and tables, truncated files.

Every format's parser gets images made by qemu-img with bytes changed at
random (mostly in the header and the tables) or cut short.  Opening must
either succeed or raise :class:`~dvmm_blk.formats.ImageError` (one line,
naming the problem); reads, writes, discards and a check of an image that
opened may fail only with OSError (EIO for a bad table entry, EINVAL for a
request past the end, EROFS), never with anything else — and the file must
not grow beyond what the writes themselves can need (no write lands at an
offset a table entry made up).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from dvmm_blk.formats import ImageError, open_image
from dvmm_blk.formats.qcow2_image import Qcow2Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_format_qemu import make_image, qemu_img

MIB = 1 << 20
SIZE = "4M"
#: Each image: what qemu-io leaves in it, so tables and data clusters exist.
COMMANDS = ["write -P 0x41 0 70k", "write -P 0x42 1M 64k", "write -z 2M 64k"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unchanged images, by kind (paths: hypothesis prints its arguments)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    out: dict[str, Path] = {}
    q = make_image(tmp / "a.qcow2", "qcow2", SIZE, "cluster_size=4096", COMMANDS)
    qemu_img("snapshot", "-c", "s1", str(q))
    out["qcow2"] = q
    out["qcow2v2"] = make_image(tmp / "b.qcow2", "qcow2", SIZE, "compat=0.10,cluster_size=512",
                                COMMANDS)
    src = make_image(tmp / "src.raw", "raw", SIZE, "", COMMANDS)
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4096",
             str(src), str(tmp / "z.qcow2"))
    out["qcow2zstd"] = tmp / "z.qcow2"
    for fmt, opts in (("vmdk", ""), ("vpc", ""), ("qed", "cluster_size=4096")):
        out[fmt] = make_image(tmp / f"x.{fmt}", fmt, SIZE, opts, COMMANDS)
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src),
             str(tmp / "s.vmdk"))
    out["vmdk-stream"] = tmp / "s.vmdk"
    return out


def mutate(data: bytes, edits: list[tuple[int, int, bool]], cut: int | None) -> bytes:
    """Set bytes (position chosen near the start or anywhere), then maybe truncate."""
    buf = bytearray(data)
    for pos, value, near_start in edits:
        where = pos % 1024 if near_start else pos % len(buf)
        buf[where] = value
    if cut is not None:
        del buf[cut % len(buf):]
    return bytes(buf)


def exercise(path: Path, fmt: str, writable: bool) -> None:
    """Open and use a hostile image; only the allowed errors may come out."""
    before = path.stat().st_size
    try:
        img = open_image(str(path), fmt.split("-")[0].removesuffix("v2").removesuffix("zstd"),
                         read_only=not writable, lock=False)
    except ImageError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    with img:
        probes = [0, 4096, MIB - 512, MIB, 2 * MIB, img.size - 4096, img.size // 2]
        for offset in sorted({p - p % 512 for p in probes if 0 <= p < img.size}):
            n = min(8192, img.size - offset)
            _allowed(img.read, offset, [memoryview(bytearray(n))])
            if writable and not img.read_only:
                _allowed(img.write, offset, [memoryview(b"\x5a" * n)])
                _allowed(img.discard, offset, n)
                _allowed(img.write_zeroes, offset, n, True)
        if isinstance(img, Qcow2Image):
            from dvmm_blk.formats.qcow2_check import check

            try:
                check(img)
            except ImageError:
                pass
    assert path.stat().st_size <= before + 16 * MIB  # no write went where a table pointed


def _allowed(call: Callable[..., None], *args: object) -> None:
    try:
        call(*args)
    except OSError as exc:
        assert exc.errno in (errno.EIO, errno.EINVAL, errno.EROFS, errno.ENOSPC), exc


KINDS = ["qcow2", "qcow2v2", "qcow2zstd", "vmdk", "vmdk-stream", "vpc", "qed"]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(0, 255), st.booleans()),
                      min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 1 << 24), writable=st.booleans())
def test_fuzzed_image_is_refused_or_served(originals: dict[str, Path], tmp_path: Path,
                                           kind: str, edits: list[tuple[int, int, bool]],
                                           cut: int | None, writable: bool) -> None:
    path = tmp_path / f"fuzz.{kind}"
    path.write_bytes(mutate(originals[kind].read_bytes(), edits, cut))
    exercise(path, kind, writable)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_images_are_refused_cleanly(originals: dict[str, Path], tmp_path: Path,
                                              kind: str) -> None:
    path = tmp_path / f"cut.{kind}"
    for length in (0, 3, 64, 71, 100, 511, 4096, 70000):
        path.write_bytes(originals[kind].read_bytes()[:length])
        exercise(path, kind, writable=True)


def test_header_fields_named_in_errors(originals: dict[str, Path], tmp_path: Path) -> None:
    """A few hand-made bad qcow2 headers: the message says which field."""
    import struct

    cases = {  # (offset, struct format, value) -> words the error must contain
        (4, ">I", 4): "version",
        (20, ">I", 30): "cluster_bits",
        (32, ">I", 1): "encrypted",
        (36, ">I", 0): "L1 table",
        (40, ">Q", 12345): "L1 table offset",
        (48, ">Q", 1 << 40): "refcount table",
        (56, ">I", 0): "refcount table",
        (72, ">Q", 1 << 20): "unknown incompatible feature",
        (96, ">I", 7): "refcount_order",
        (100, ">I", 13): "header_length",
    }
    for (offset, fmt, value), words in cases.items():
        data = bytearray(originals["qcow2"].read_bytes())
        struct.pack_into(fmt, data, offset, value)
        path = tmp_path / "h.qcow2"
        path.write_bytes(data)
        with pytest.raises(ImageError, match=words):
            open_image(str(path), "qcow2", read_only=True, lock=False).close()


def test_backing_file_that_is_a_directory(tmp_path: Path) -> None:
    base = tmp_path / "dir"
    base.mkdir()
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "dir", "-F", "raw", str(top), "1M")
    with pytest.raises(ImageError, match="directory"):
        open_image(str(top), read_only=True)
    shutil.rmtree(base)
    with pytest.raises(ImageError, match="backing file"):
        open_image(str(top), read_only=True)


def qcow2_tables(data: bytes) -> list[int]:
    """File offsets of the 8-byte entries of a qcow2 image's L1, L2 and
    refcount tables, and of its refcount blocks' first bytes."""
    import struct

    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", data, 36)
    spots = [l1_off + 8 * i for i in range(l1_size)]
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FF_FFFF_FFFF_FE00
        spots += [l2 + 8 * j for j in range(min(64, cs // 8))] if l2 else []
    for i in range(rt_clusters * cs // 8):
        rb = struct.unpack_from(">Q", data, rt_off + 8 * i)[0]
        if rb:
            spots += [rt_off + 8 * i, rb, rb + 8]
    return [s for s in spots if s + 8 <= len(data)]


@pytest.mark.parametrize("kind", ["qcow2", "qcow2v2", "qcow2zstd"])
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1),
                                st.integers(0, 63), st.booleans()), min_size=1, max_size=4),
       writable=st.booleans())
def test_fuzzed_table_entries(originals: dict[str, Path], tmp_path: Path, kind: str,
                              picks: list[tuple[int, int, int, bool]], writable: bool) -> None:
    """L1, L2 and refcount entries set to random values or with one bit flipped."""
    import struct

    data = bytearray(originals[kind].read_bytes())
    spots = qcow2_tables(bytes(data))
    for index, value, bit, flip in picks:
        where = spots[index % len(spots)]
        old = struct.unpack_from(">Q", data, where)[0]
        struct.pack_into(">Q", data, where, old ^ (1 << bit) if flip else value)
    path = tmp_path / f"t.{kind}"
    path.write_bytes(data)
    exercise(path, kind, writable)
