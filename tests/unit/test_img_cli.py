"""``dvmm img`` against ``qemu-img``: same reports, same exit statuses, images it accepts.

Each verb runs in-process (``dvmm_core.cli.main``) and its output is
compared with what qemu-img says about the same file: ``info`` (human and
JSON), ``check`` (clean, leaked, corrupt; ``-r leaks``), ``snapshot -l``
(the same table), ``create`` (images qemu-img checks clean and describes as
asked) and ``convert`` (from every format dvmm reads; qemu-img compare
finds the copy identical).
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from dvmm_core.cli import main

from .test_format_qemu import PATTERN, make_image, qemu_img, qemu_io


def dvmm_img(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["img", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def without_disk_size(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not ln.startswith("disk size:")]


@pytest.mark.parametrize("options", ["compat=1.1", "compat=0.10",
                                     "cluster_size=4096,refcount_bits=8",
                                     "compression_type=zstd,lazy_refcounts=on"])
def test_info_matches_qemu_img(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               options: str) -> None:
    base = make_image(tmp_path / "base.raw", "raw", "8M")
    img = make_image(tmp_path / "a.qcow2", "qcow2", options=options, backing=base,
                     backing_fmt="raw", commands=PATTERN[:1])
    status, out, _ = dvmm_img(capsys, "info", str(img))
    assert status == 0
    assert without_disk_size(out) == without_disk_size(qemu("info", str(img)).stdout)
    status, out, _ = dvmm_img(capsys, "info", "--output", "json", str(img))
    ours, theirs = json.loads(out), json.loads(qemu("info", "--output=json", str(img)).stdout)
    for key in ("virtual-size", "format", "cluster-size", "format-specific", "dirty-flag",
                "backing-filename", "backing-filename-format"):
        assert ours.get(key) == theirs.get(key), key
    status, out, _ = dvmm_img(capsys, "info", "--backing-chain", str(img))
    assert [ln for ln in out.splitlines() if ln.startswith("file format")] == \
        ["file format: qcow2", "file format: raw"]


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "qed", "raw"])
def test_info_of_other_formats(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               fmt: str) -> None:
    img = make_image(tmp_path / f"x.{fmt}", fmt, "5M")
    status, out, _ = dvmm_img(capsys, "info", "--output", "json", str(img))
    theirs = json.loads(qemu("info", "--output=json", "-f", fmt, str(img)).stdout)
    ours = json.loads(out)
    assert status == 0 and ours["format"] == fmt
    assert ours["virtual-size"] == theirs["virtual-size"]


def leak_and_corrupt(tmp_path: Path) -> tuple[Path, Path]:
    """Two images qemu-io wrote: one with a leaked cluster, one with an
    in-use cluster whose refcount is 0."""
    leak = make_image(tmp_path / "leak.qcow2", "qcow2", "4M", commands=["write 0 128k"])
    with leak.open("r+b") as f:  # drop the second cluster's L2 entry
        f.seek(0x40000 + 8)
        f.write(bytes(8))
    bad = make_image(tmp_path / "bad.qcow2", "qcow2", "4M", commands=["write 0 64k"])
    with bad.open("r+b") as f:  # refcount of cluster 3 (the L2 table) -> 0
        f.seek(0x20000 + 6)
        f.write(struct.pack(">H", 0))
    return leak, bad


def test_check_matches_qemu_img(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    clean = make_image(tmp_path / "c.qcow2", "qcow2", "4M", commands=PATTERN[:1])
    leak, bad = leak_and_corrupt(tmp_path)
    for path, status in ((clean, 0), (leak, 3), (bad, 2)):
        ours = dvmm_img(capsys, "check", str(path))
        theirs = qemu("check", str(path))
        assert ours[0] == theirs.returncode == status, (path, ours, theirs.stdout)
        assert ours[1] == theirs.stdout
        assert sorted(set(ours[2].splitlines())) == sorted(set(theirs.stderr.splitlines()))
        j = json.loads(dvmm_img(capsys, "check", "--output", "json", str(path))[1])
        assert {k: v for k, v in j.items() if k != "fragmented-clusters"} == {
            k: v for k, v in json.loads(qemu("check", "--output=json", str(path)).stdout).items()
            if k != "fragmented-clusters"}


def test_check_repairs_leaks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    leak, _ = leak_and_corrupt(tmp_path)
    status, out, _ = dvmm_img(capsys, "check", "-r", "leaks", str(leak))
    assert status == 0 and "1 leaked clusters" in out
    assert qemu("check", str(leak)).returncode == 0
    vpc = make_image(tmp_path / "x.vpc", "vpc", "1M")
    assert dvmm_img(capsys, "check", str(vpc))[0] == 63  # qemu-img: no checks for vpc


def test_snapshot_list_matches_qemu_img(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    img = make_image(tmp_path / "s.qcow2", "qcow2", "4M", commands=PATTERN[:1])
    qemu_img("snapshot", "-c", "first", str(img))
    qemu_img("snapshot", "-c", "a-much-longer-snapshot-name", str(img))
    status, out, _ = dvmm_img(capsys, "snapshot", "-l", str(img))
    assert status == 0 and out == qemu("snapshot", "-l", str(img)).stdout
    listed = json.loads(dvmm_img(capsys, "snapshot", "-l", "--output", "json", str(img))[1])
    assert [s["name"] for s in listed] == ["first", "a-much-longer-snapshot-name"]


@pytest.mark.parametrize("args", [["-f", "qcow2"], ["-f", "qcow2", "-o", "compat=0.10"],
                                  ["-f", "qcow2", "-o", "cluster_size=512,refcount_bits=2"],
                                  ["-f", "qcow2", "-o", "compression_type=zstd"],
                                  ["-f", "raw"]])
def test_created_images_check_clean(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    args: list[str]) -> None:
    path = tmp_path / "new.img"
    status, out, _ = dvmm_img(capsys, "create", *args, str(path), "64M")
    assert status == 0 and out.startswith(f"Formatting '{path}', fmt={args[1]}")
    info = json.loads(qemu("info", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == 64 << 20 and info["format"] == args[1]
    if args[1] == "qcow2":
        assert qemu("check", str(path)).returncode == 0
        qemu_io(path, "qcow2", *PATTERN[:2])
        assert qemu("check", str(path)).returncode == 0


def test_create_with_backing_takes_its_size(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    base = make_image(tmp_path / "b.qcow2", "qcow2", "7M", commands=PATTERN[:1])
    top = tmp_path / "t.qcow2"
    status, out, _ = dvmm_img(capsys, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2",
                              str(top))
    assert status == 0 and "backing_file=b.qcow2 backing_fmt=qcow2" in out
    assert qemu("compare", str(top), str(base)).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "qed"])
@pytest.mark.parametrize("target", ["raw", "qcow2"])
def test_convert_is_identical(capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str,
                              target: str) -> None:
    src = make_image(tmp_path / f"s.{fmt}", fmt, "33M", commands=PATTERN)
    dst = tmp_path / f"d.{target}"
    status, _, _ = dvmm_img(capsys, "convert", "-f", fmt, "-O", target, str(src), str(dst))
    assert status == 0
    done = qemu("compare", "-f", fmt, "-F", target, str(src), str(dst))
    assert done.returncode == 0, done.stdout
    if target == "qcow2":
        assert qemu("check", str(dst)).returncode == 0


def test_convert_a_snapshot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    img = make_image(tmp_path / "s.qcow2", "qcow2", "4M", commands=PATTERN[:1])
    qemu_img("snapshot", "-c", "old", str(img))
    qemu_io(img, "qcow2", "write -P 0x77 0 1M")
    assert dvmm_img(capsys, "convert", "-l", "old", str(img), str(tmp_path / "o.raw"))[0] == 0
    qemu_img("convert", "-l", "old", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = dvmm_img(capsys, "info", str(tmp_path / "missing.qcow2"))
    assert status == 1 and err.count("\n") == 1 and "No such file" in err
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(100))
    status, _, err = dvmm_img(capsys, "info", str(bad))
    assert status == 1 and err.count("\n") == 1 and "qcow2" in err
    status, _, err = dvmm_img(capsys, "snapshot", "-l", "-f", "qcow2", str(bad))
    assert status == 1 and err.count("\n") == 1
