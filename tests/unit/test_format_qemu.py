"""Images made by qemu-img and written by qemu-io read byte-identically through dvmm.

For every format dvmm reads (qcow2 v2/v3 with its variants — cluster sizes,
refcount widths, zlib and zstd compressed clusters, zero clusters,
snapshots, a backing chain of three — vmdk monolithicSparse and
streamOptimized, vpc fixed and dynamic, qed with and without a backing
file) the reference is ``qemu-img convert -O raw``, compared with what
:func:`dvmm_blk.formats.open_image` reads.  The helpers here (running
qemu-img and qemu-io, the raw reference) are shared by the other format
tests.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from dvmm_blk.formats import open_image

MIB = 1 << 20
#: qemu-io commands that leave data, zeros, a partial cluster and a hole.
PATTERN = ["write -P 0x41 0 100k", "write -P 0x42 5M 1M", "write -P 0x43 20000k 4k",
           "write -P 0x44 12M 64k"]


def qemu_img(*args: str) -> str:
    tool = shutil.which("qemu-img")
    if tool is None:
        pytest.fail("qemu-img is not installed (apt-get install qemu-utils)")
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"qemu-img {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def qemu_io(path: Path, fmt: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    done = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr


def make_image(path: Path, fmt: str, size: str = "33M", options: str = "",
               commands: list[str] | None = None, backing: Path | None = None,
               backing_fmt: str | None = None) -> Path:
    args = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "raw"]
    qemu_img(*args, str(path), *([size] if backing is None else []))
    if commands:
        qemu_io(path, fmt, *commands)
    return path


def raw_of(path: Path, fmt: str, snapshot: str | None = None) -> bytes:
    """What qemu-img says the guest sees: ``convert -O raw``."""
    out = path.with_suffix(path.suffix + ".ref.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", *(["-l", snapshot] if snapshot else []),
             str(path), str(out))
    return out.read_bytes()


def dvmm_bytes(path: Path, fmt: str = "auto", snapshot: str | None = None) -> bytes:
    with open_image(str(path), fmt, True, snapshot=snapshot) as img:
        return img.read_bytes(0, img.size)


def assert_same(ours: bytes, ref: bytes) -> None:
    assert len(ours) == len(ref)
    if ours != ref:
        first = next(i for i in range(len(ref)) if ours[i] != ref[i])
        pytest.fail(f"first difference at byte {first} ({hashlib.sha256(ours).hexdigest()[:12]}"
                    f" vs {hashlib.sha256(ref).hexdigest()[:12]})")


QCOW2_VARIANTS = ["compat=1.1", "compat=0.10", "cluster_size=512", "cluster_size=4096",
                  "cluster_size=2M", "refcount_bits=1", "refcount_bits=64",
                  "compression_type=zstd", "lazy_refcounts=on"]


@pytest.mark.parametrize("options", QCOW2_VARIANTS)
def test_qcow2_made_by_qemu_reads_identically(tmp_path: Path, options: str) -> None:
    path = make_image(tmp_path / "a.qcow2", "qcow2", options=options, commands=[
        *PATTERN, "write -c -P 0x45 8M 2M", "write -z 5M 128k"]
        + ([] if "0.10" in options else ["write -z -u 12M 64k"]))
    assert_same(dvmm_bytes(path), raw_of(path, "qcow2"))


def test_qcow2_compressed_clusters_read(tmp_path: Path) -> None:
    for kind in ("zlib", "zstd"):
        src = tmp_path / f"src-{kind}.raw"
        src.write_bytes(bytes(range(256)) * 4096 + bytes(3 * MIB) + b"dvmm" * 65536)
        path = tmp_path / f"c-{kind}.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type={kind}", str(src), str(path))
        with open_image(str(path), "qcow2", True) as img:
            assert img.header.compression_type == (1 if kind == "zstd" else 0)  # type: ignore[attr-defined]
        assert_same(dvmm_bytes(path), src.read_bytes())


def test_qcow2_snapshots_readable(tmp_path: Path) -> None:
    path = make_image(tmp_path / "s.qcow2", "qcow2", commands=PATTERN)
    qemu_img("snapshot", "-c", "first", str(path))
    qemu_io(path, "qcow2", "write -P 0x51 0 1M", "write -z 5M 64k")
    qemu_img("snapshot", "-c", "second", str(path))
    qemu_io(path, "qcow2", "write -P 0x52 512k 1M")
    for snap in ("first", "second", "1"):
        assert_same(dvmm_bytes(path, snapshot=snap), raw_of(path, "qcow2", snap))
    assert_same(dvmm_bytes(path), raw_of(path, "qcow2"))


def test_backing_chain_of_three(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes([7]) * 16 * MIB)
    mid = make_image(tmp_path / "mid.qcow2", "qcow2", backing=base, backing_fmt="raw",
                     commands=["write -P 0x11 1M 1M", "write -z 3M 64k"])
    top = make_image(tmp_path / "top.qcow2", "qcow2", backing=mid, backing_fmt="qcow2",
                     options="compat=0.10", commands=["write -P 0x22 1536k 64k"])
    with open_image(str(top)) as img:
        assert [i.format_name for i in img.chain()] == ["qcow2", "qcow2", "raw"]
    assert_same(dvmm_bytes(top), raw_of(top, "qcow2"))


@pytest.mark.parametrize(("fmt", "options"), [
    ("vmdk", ""), ("vmdk", "subformat=streamOptimized"), ("vpc", ""),
    ("vpc", "subformat=fixed"), ("vpc", "force_size=on"), ("qed", ""),
    ("qed", "cluster_size=4096")])
def test_read_only_formats_read_identically(tmp_path: Path, fmt: str, options: str) -> None:
    path = tmp_path / f"x.{fmt}"
    if "streamOptimized" in options:  # written once, as a stream: convert into it
        src = make_image(tmp_path / "src.qcow2", "qcow2", commands=PATTERN)
        qemu_img("convert", "-O", "vmdk", "-o", options, str(src), str(path))
    else:
        make_image(path, fmt, options=options, commands=PATTERN)
    assert_same(dvmm_bytes(path, fmt), raw_of(path, fmt))
    with open_image(str(path), fmt) as img:  # opened read-only whatever was asked
        assert img.read_only


def test_qed_with_backing(tmp_path: Path) -> None:
    base = make_image(tmp_path / "b.qcow2", "qcow2", commands=PATTERN)
    top = make_image(tmp_path / "t.qed", "qed", backing=base, backing_fmt="qcow2",
                     commands=["write -P 0x66 5M 64k"])
    assert_same(dvmm_bytes(top), raw_of(top, "qed"))


def test_auto_detects_each_format(tmp_path: Path) -> None:
    from dvmm_blk.formats import probe_file

    for fmt in ("qcow2", "vmdk", "vpc", "qed", "raw"):
        make_image(tmp_path / f"p.{fmt}", fmt, size="1M")
        assert probe_file(str(tmp_path / f"p.{fmt}")) == fmt
