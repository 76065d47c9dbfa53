"""The demo boot disk (:mod:`dvmm_core.boot.demo`) against QEMU and SeaBIOS.

The pure part checks the checksum against a closed form, the serial-log
parser against logs captured from QEMU, the image layout and the CLI.  The
QEMU part (marker ``conformance``) boots demo disks in QEMU (TCG) with
Debian's SeaBIOS from a virtio-blk drive and requires the checksum the
boot program prints to equal the one computed in Python, for payloads of
1 MiB and more, odd chunk sizes, both reset actions and a read error.
QEMU's output is read with a deadline until the expected line appears; QEMU
is always killed afterwards.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvmm_core.boot import demo
from dvmm_core.boot.demo import (
    BANNER,
    DONE,
    PARAMS_OFFSET,
    SECTOR_SIZE,
    BootBuildError,
    DemoChecksum,
    DemoDisk,
    DemoResult,
    assemble_boot_sector,
    demo_checksum,
    make_demo_disk,
    parse_demo_output,
    parse_demo_runs,
)
from dvmm_shared.cli import UsageError
from hypothesis import given, settings
from hypothesis import strategies as st

QEMU = shutil.which("qemu-system-x86_64")
SEABIOS = Path("/usr/share/seabios/bios.bin")
QEMU_TIMEOUT = 60.0

needs_binutils = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None,
    reason="binutils (as, ld) not installed: apt-get install binutils")
needs_qemu = pytest.mark.skipif(
    QEMU is None or not SEABIOS.is_file(),
    reason="needs qemu-system-x86_64 and /usr/share/seabios/bios.bin "
           "(apt-get install qemu-system-x86 seabios)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("boot-cache")


# --------------------------------------------------------------------------
# The checksum


def closed_form(data: bytes) -> int:
    """sum((n - i) * w[i]) mod 2**32: the checksum computed another way."""
    words: list[int] = [w for (w,) in struct.iter_unpack("<I", data)]
    n = len(words)
    return sum((n - i) * w for i, w in enumerate(words)) % (1 << 32)


def test_checksum_known_values() -> None:
    assert demo_checksum(b"") == 0
    assert demo_checksum(struct.pack("<3I", 1, 2, 3)) == 10          # B = 1 + 3 + 6
    assert demo_checksum(b"\xff" * 8) == 0xFFFF_FFFD                 # wraps mod 2**32
    assert demo_checksum(b"\x01\x00\x00\x00" + b"\x00" * 508) == 128  # first word of a sector


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096).map(lambda b: b[: len(b) // 4 * 4]))
def test_checksum_matches_closed_form(data: bytes) -> None:
    assert demo_checksum(data) == closed_form(data)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=8, max_size=2048).map(lambda b: b[: len(b) // 4 * 4]),
       st.integers(min_value=0, max_value=512))
def test_checksum_incremental(data: bytes, cut: int) -> None:
    cut = min(cut * 4, len(data))
    state = DemoChecksum()
    state.update(data[:cut])
    state.update(memoryview(data)[cut:])
    assert state.value == demo_checksum(data)
    assert state.words == len(data) // 4


def test_checksum_notices_sector_order() -> None:
    one, two = bytes(range(256)) * 2, bytes(reversed(range(256))) * 2
    assert demo_checksum(one + two) != demo_checksum(two + one)


def test_checksum_rejects_partial_words() -> None:
    with pytest.raises(ValueError, match="32-bit words"):
        demo_checksum(b"abc")


# --------------------------------------------------------------------------
# Parsing serial logs (captured from QEMU 7.2 + SeaBIOS 1.16.2 -nographic)

SEABIOS_HEAD = ("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
                "Booting from Hard Disk..\r\n")
RUN = ("dvmm-demo: booted\r\ndvmm-demo: message: hello from the dvmm demo disk\r\n"
       ".\r\n"  # SeaBIOS's lazily flushed last '.' of "Booting from Hard Disk..."
       "dvmm-demo: read 2048 sectors checksum 55DB3D31\r\ndvmm-demo: done\r\n")


def test_parse_a_qemu_log() -> None:
    result = parse_demo_output(SEABIOS_HEAD + RUN)
    assert result == DemoResult(boots=1, message="hello from the dvmm demo disk",
                                sectors=2048, checksum=0x55DB3D31, done=True)
    assert result.ok


def test_parse_reset_log_counts_boots_and_reports_the_first() -> None:
    text = SEABIOS_HEAD + RUN + SEABIOS_HEAD + "dvmm-demo: booted\r\ndvmm-demo: mess"
    result = parse_demo_output(text)
    assert result is not None and result.ok and result.boots == 2
    runs = parse_demo_runs(text)
    assert [r.done for r in runs] == [True, False]
    assert runs[1].message is None and runs[1].boots == 2


def test_parse_is_robust_to_escapes_and_mid_line_starts() -> None:
    text = ("Booting from Hard Disk..dvmm-demo: booted\r\n\x1b[1;1H\x1b[0;31m"
            "dvmm-demo: message: \r\n\x00dvmm-demo: read 7 sectors checksum 0000abcd\r"
            "\x1b]0;title\x07dvmm-demo: done\n")
    result = parse_demo_output(text)
    assert result == DemoResult(boots=1, message="", sectors=7, checksum=0xABCD, done=True)


def test_parse_errors() -> None:
    text = SEABIOS_HEAD + "dvmm-demo: booted\r\ndvmm-demo: read error AH=0C at LBA 2049\r\n"
    result = parse_demo_output(text)
    assert result is not None and not result.ok
    assert result.error == "read error AH=0C at LBA 2049" and result.sectors is None
    bad = parse_demo_output("dvmm-demo: booted\r\ndvmm-demo: bad params\r\n")
    assert bad is not None and bad.error == "bad params" and not bad.ok


def test_parse_without_banner() -> None:
    assert parse_demo_output("") is None
    assert parse_demo_output(SEABIOS_HEAD + "No bootable device.\r\n") is None
    assert parse_demo_output("dvmm-demo: done\r\n") is None


# --------------------------------------------------------------------------
# Building the sector and the image


@needs_binutils
def test_boot_sector_shape(cache_dir: Path) -> None:
    sector = assemble_boot_sector(cache_dir)
    assert len(sector) == SECTOR_SIZE and sector[510:] == b"\x55\xaa"
    assert sector[PARAMS_OFFSET:PARAMS_OFFSET + 4] == b"DVMD"
    # No partition table: the first entry's boot indicator is neither 0 nor 0x80.
    assert sector[0x1BE] not in (0x00, 0x80)


@needs_binutils
def test_boot_sector_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = assemble_boot_sector(cache)
    (cached,) = cache.glob("demo_boot-*.bin")
    assert cached.read_bytes() == first

    def no_build(source: bytes) -> bytes:
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(demo, "_build", no_build)
    assert assemble_boot_sector(cache) == first
    monkeypatch.undo()
    cached.write_bytes(b"damaged")
    assert assemble_boot_sector(cache) == first
    assert cached.read_bytes() == first
    monkeypatch.setenv("DVMM_CACHE", str(tmp_path / "env"))
    assert assemble_boot_sector() == first
    assert list((tmp_path / "env" / "dvmm" / "boot").glob("demo_boot-*.bin"))


def test_boot_sector_without_binutils(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BootBuildError) as info:
        assemble_boot_sector(tmp_path / "empty-cache")
    message = str(info.value)
    assert "binutils" in message and "\n" not in message
    assert isinstance(info.value, UsageError)


@needs_binutils
def test_make_demo_disk_layout(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "demo.img"
    disk = make_demo_disk(path, payload_sectors=3000, after="reset-cf9", seed=7,
                          message="abc", chunk_sectors=100, cache_dir=cache_dir)
    image = path.read_bytes()
    assert len(image) == disk.size == 2 << 20   # 3001 sectors, padded to whole MiBs
    assert image[:SECTOR_SIZE] != assemble_boot_sector(cache_dir)
    magic, sectors, after, chunk = struct.unpack_from("<4sIBB", image, PARAMS_OFFSET)
    assert (magic, sectors, after, chunk) == (b"DVMD", 3000, 1, 100)
    payload = image[SECTOR_SIZE:SECTOR_SIZE * 3001]
    assert payload.startswith(b"abc\n")
    assert disk.checksum == demo_checksum(payload) == closed_form(payload)
    assert image[SECTOR_SIZE * 3001:] == bytes(len(image) - SECTOR_SIZE * 3001)
    assert disk.expected_lines() == [
        BANNER, "dvmm-demo: message: abc",
        f"dvmm-demo: read 3000 sectors checksum {disk.checksum:08X}", DONE]

    again = make_demo_disk(tmp_path / "again.img", 3000, "reset-cf9", 7, "abc", 100,
                           cache_dir=cache_dir)
    assert (tmp_path / "again.img").read_bytes() == image and again.checksum == disk.checksum
    other = make_demo_disk(tmp_path / "other.img", 3000, seed=8, message="abc",
                           cache_dir=cache_dir)
    assert other.checksum != disk.checksum


@needs_binutils
def test_make_demo_disk_without_payload(tmp_path: Path, cache_dir: Path) -> None:
    disk = make_demo_disk(tmp_path / "empty.img", payload_sectors=0, cache_dir=cache_dir)
    assert disk.checksum == 0 and disk.message is None
    assert disk.expected_lines() == [BANNER, "dvmm-demo: read 0 sectors checksum 00000000", DONE]
    assert (tmp_path / "empty.img").stat().st_size == 1 << 20


@pytest.mark.parametrize("kwargs, match", [
    ({"payload_sectors": -1}, "payload sectors"),
    ({"after": "reboot"}, "after"),
    ({"chunk_sectors": 0}, "sectors per read"),
    ({"chunk_sectors": 128}, "sectors per read"),
    ({"message": "x" * 65}, "message"),
    ({"message": "two\nlines"}, "message"),
])
def test_make_demo_disk_rejects(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_demo_disk(tmp_path / "x.img", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "x.img").exists()


def test_mismatches() -> None:
    disk = DemoDisk(path=Path("x"), sectors=4, checksum=0x1234, message="m")
    good = DemoResult(boots=1, message="m", sectors=4, checksum=0x1234, done=True)
    assert disk.mismatches(good) == []
    assert disk.mismatches(None) == ["no 'dvmm-demo: booted' banner in the output"]
    bad = DemoResult(boots=1, message="m", sectors=4, checksum=0x1235, done=False)
    assert disk.mismatches(bad) == ["checksum 00001235, expected 00001234",
                                    "no 'dvmm-demo: done' line"]


@needs_binutils
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVMM_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser(prog="dvmm")
    demo.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo-disk", str(tmp_path / "d.img"), "--sectors", "16",
                              "--after", "reset-kbd"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    disk = make_demo_disk(tmp_path / "check.img", 16, "reset-kbd")
    assert disk.checksum_hex in out and "dvmm-demo: done" in out
    assert (tmp_path / "d.img").read_bytes() == (tmp_path / "check.img").read_bytes()

    bad = parser.parse_args(["demo-disk", str(tmp_path / "d.img"), "--chunk", "200"])
    with pytest.raises(UsageError, match="sectors per read"):
        bad.func(bad)
    missing = parser.parse_args(["demo-disk", str(tmp_path / "no" / "such" / "d.img")])
    with pytest.raises(UsageError, match="cannot write"):
        missing.func(missing)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo-disk", "x.img", "--after", "explode"])


# --------------------------------------------------------------------------
# Booting in QEMU


@dataclass
class QemuRun:
    text: str                  # everything QEMU wrote (serial console + messages)
    seconds: float             # from start until the condition held (or the end)
    exit_status: int | None    # set when QEMU exited by itself


def boot_in_qemu(image: Path, until: Callable[[DemoResult | None], bool], *,
                 reboot: bool = False, timeout: float = QEMU_TIMEOUT) -> QemuRun:
    """Boot ``image`` in QEMU (TCG, SeaBIOS, virtio-blk) until ``until`` holds.

    ``until`` sees the parse of the output's complete lines after every read;
    the run also ends when QEMU exits or ``timeout`` passes.  QEMU is killed
    in any case.
    """
    assert QEMU is not None
    argv = [QEMU, "-accel", "tcg", "-M", "pc", "-m", "128", "-bios", str(SEABIOS),
            "-drive", f"file={image},format=raw,if=virtio", "-nic", "none", "-nographic"]
    if not reboot:
        argv.append("-no-reboot")
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = bytearray()
    exit_status: int | None = None
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            deadline = start + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    exit_status = proc.wait(timeout=10)
                    break
                out += chunk
                text = out.decode("ascii", "replace")
                if until(parse_demo_output(text[: text.rfind("\n") + 1])):
                    break
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    return QemuRun(out.decode("ascii", "replace"), seconds, exit_status)


def finished(result: DemoResult | None) -> bool:
    return result is not None and (result.done or result.error is not None)


def describe(run: QemuRun) -> str:
    return f"after {run.seconds:.1f} s, QEMU output:\n{run.text[-2000:]}"


@needs_binutils
@needs_qemu
@pytest.mark.conformance
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sectors, chunk", [(2048, 64), (4099, 127), (8192, 13)])
def test_qemu_reads_the_payload(tmp_path: Path, cache_dir: Path, sectors: int,
                                chunk: int) -> None:
    disk = make_demo_disk(tmp_path / "demo.img", sectors, chunk_sectors=chunk,
                          cache_dir=cache_dir)
    run = boot_in_qemu(disk.path, finished)
    result = parse_demo_output(run.text)
    assert disk.mismatches(result) == [], describe(run)
    assert result is not None and result.boots == 1
    lines = [ln for ln in run.text.replace("\r", "").split("\n") if ln.startswith("dvmm-demo: ")]
    assert lines == disk.expected_lines(), describe(run)
    print(f"QEMU TCG: {sectors} sectors ({sectors // 2} KiB) in {chunk}-sector reads: "
          f"checksum {disk.checksum_hex} after {run.seconds:.2f} s")


@needs_binutils
@needs_qemu
@pytest.mark.conformance
@pytest.mark.timeout(180)
def test_qemu_reset_cf9_reboots(tmp_path: Path, cache_dir: Path) -> None:
    disk = make_demo_disk(tmp_path / "demo.img", 2048, after="reset-cf9", cache_dir=cache_dir)
    run = boot_in_qemu(disk.path, lambda r: r is not None and r.boots >= 2, reboot=True)
    result = parse_demo_output(run.text)
    assert result is not None and result.boots >= 2, describe(run)
    assert disk.mismatches(result) == [], describe(run)
    assert run.exit_status is None   # it rebooted; we stopped it
    print(f"QEMU TCG: reset via 0xCF9, second banner after {run.seconds:.2f} s")


@needs_binutils
@needs_qemu
@pytest.mark.conformance
@pytest.mark.timeout(180)
def test_qemu_reset_kbd_ends_qemu_with_no_reboot(tmp_path: Path, cache_dir: Path) -> None:
    disk = make_demo_disk(tmp_path / "demo.img", 2048, after="reset-kbd", cache_dir=cache_dir)
    run = boot_in_qemu(disk.path, lambda r: False)   # until QEMU exits by itself
    result = parse_demo_output(run.text)
    assert run.exit_status == 0, describe(run)      # -no-reboot: the reset ends QEMU
    assert result is not None and result.boots == 1
    assert disk.mismatches(result) == [], describe(run)
    print(f"QEMU TCG: reset via the i8042 ended QEMU after {run.seconds:.2f} s")


@needs_binutils
@needs_qemu
@pytest.mark.conformance
@pytest.mark.timeout(180)
def test_qemu_read_error_is_reported(tmp_path: Path, cache_dir: Path) -> None:
    disk = make_demo_disk(tmp_path / "demo.img", 4096, cache_dir=cache_dir)
    os.truncate(disk.path, (1 + 2048) * SECTOR_SIZE)   # the disk ends after LBA 2048
    run = boot_in_qemu(disk.path, finished)
    result = parse_demo_output(run.text)
    assert result is not None, describe(run)
    # SeaBIOS rejects an extended read starting past the end with AH=01.
    assert result.error == "read error AH=01 at LBA 2049", describe(run)
    assert result.message == disk.message and not result.done
