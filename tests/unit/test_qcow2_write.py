"""qcow2 images written through dvmm pass qemu-img check and compare equal.

Random writes, write-zeroes and discards (seeded) go through
:class:`dvmm_blk.formats.qcow2_image.Qcow2Image` while a bytearray model
follows them; afterwards ``qemu-img check`` must find no errors and no leaks
and ``qemu-img compare`` must find the image equal to the model.  Also:
engines' worker threads writing at once, writes beside internal snapshots
(copy-on-write leaves them intact), the dirty bit, and a writer process
SIGKILLed over and over (every acknowledged write present, never an error
from qemu-img check — only leaks, which the next open reclaims).
"""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dvmm_blk.formats import open_image
from dvmm_blk.formats.qcow2_header import INCOMPAT_DIRTY
from dvmm_blk.formats.qcow2_image import Qcow2Image

from .test_format_qemu import PATTERN, make_image, qemu_img, qemu_io, raw_of

MIB = 1 << 20


def check_clean(path: Path) -> str:
    done = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def compare(path: Path, model: bytes, tmp: Path) -> None:
    ref = tmp / "model.raw"
    ref.write_bytes(model)
    done = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path),
                           str(ref)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def random_ops(img: Qcow2Image, model: bytearray, rng: random.Random, count: int) -> None:
    size = img.size
    for _ in range(count):
        off = rng.randrange(size // 512) * 512
        n = min(rng.choice([512, 4096, 65536, 131072, 300 * 512, MIB]), size - off)
        op = rng.random()
        if op < 0.65:
            data = rng.randbytes(n)
            img.write(off, [memoryview(data)])
            model[off:off + n] = data
        elif op < 0.85:
            img.write_zeroes(off, n, rng.random() < 0.5)
            model[off:off + n] = bytes(n)
        else:  # discard: the range reads as zeros or as the backing file afterwards
            img.discard(off, n)
            model[off:off + n] = img.read_bytes(off, n)


@pytest.mark.parametrize("options", ["compat=1.1", "compat=0.10", "cluster_size=512",
                                     "cluster_size=1024,refcount_bits=4",
                                     "cluster_size=512,refcount_bits=1", "refcount_bits=64",
                                     "cluster_size=2M", "compression_type=zstd"])
def test_random_writes_check_clean(tmp_path: Path, options: str) -> None:
    path = make_image(tmp_path / "w.qcow2", "qcow2", size="24M", options=options,
                      commands=[*PATTERN[:2], "write -c -P 0x45 8M 2M"])
    model = bytearray(raw_of(path, "qcow2"))
    rng = random.Random(f"{options}")
    with open_image(str(path)) as img:
        assert isinstance(img, Qcow2Image)
        random_ops(img, model, rng, 250)
        assert img.read_bytes(0, img.size) == model
    check_clean(path)
    compare(path, bytes(model), tmp_path)


def test_refcount_table_grows(tmp_path: Path) -> None:
    path = make_image(tmp_path / "g.qcow2", "qcow2", size="32M", options="cluster_size=512")
    with open_image(str(path)) as img:
        assert isinstance(img, Qcow2Image) and img.refs is not None
        before = img.refs.table_offset
        for off in range(0, 20 * MIB, 256 * 1024):
            img.write(off, [memoryview(bytes([off >> 18 & 255]) * 256 * 1024)])
        assert img.refs.table_offset != before
    check_clean(path)
    qemu_io(path, "qcow2", "read -P 5 1280k 256k")


def test_backing_chain_written(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(16 * MIB))
    mid = make_image(tmp_path / "mid.qcow2", "qcow2", backing=base, backing_fmt="raw",
                     commands=["write -P 0x11 1M 1M"])
    top = make_image(tmp_path / "top.qcow2", "qcow2", backing=mid, backing_fmt="qcow2")
    model = bytearray(raw_of(top, "qcow2"))
    with open_image(str(top)) as img:
        random_ops(img, model, random.Random(2), 200)  # type: ignore[arg-type]
    check_clean(top)
    compare(top, bytes(model), tmp_path)
    assert raw_of(mid, "qcow2")[MIB:2 * MIB] == b"\x11" * MIB  # the lower images untouched


def test_snapshots_survive_writes(tmp_path: Path) -> None:
    path = make_image(tmp_path / "s.qcow2", "qcow2", size="16M",
                      commands=[*PATTERN[:2], "write -c -P 0x46 8M 1M"])
    qemu_img("snapshot", "-c", "before", str(path))
    frozen = raw_of(path, "qcow2", "before")
    model = bytearray(frozen)
    with open_image(str(path)) as img:
        random_ops(img, model, random.Random(3), 150)  # type: ignore[arg-type]
    check_clean(path)
    compare(path, bytes(model), tmp_path)
    assert raw_of(path, "qcow2", "before") == frozen


def test_concurrent_writers(tmp_path: Path) -> None:
    """Worker threads of an engine write disjoint ranges at once."""
    path = make_image(tmp_path / "c.qcow2", "qcow2", size="32M", options="cluster_size=4096")
    model = bytearray(32 * MIB)
    errors: list[BaseException] = []
    with open_image(str(path)) as img:
        def worker(k: int) -> None:
            rng = random.Random(k)
            try:
                for _ in range(150):  # thread k owns the 4 KiB-aligned slots k mod 4
                    slot = rng.randrange(2048) * 4 + k
                    n = rng.choice([512, 4096])
                    data = rng.randbytes(n)
                    img.write(slot * 4096, [memoryview(data)])
                    model[slot * 4096:slot * 4096 + n] = data
            except BaseException as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert img.read_bytes(0, img.size) == model
    check_clean(path)


def test_dirty_bit_while_open(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2", "qcow2", size="4M")
    with open_image(str(path)) as img:
        assert isinstance(img, Qcow2Image)
        assert img.header.incompatible & INCOMPAT_DIRTY
        assert "cleanly shut down: no" in qemu_img("info", "-U", str(path))
    assert "cleanly shut down" not in qemu_img("info", str(path))
    v2 = make_image(tmp_path / "v2.qcow2", "qcow2", size="4M", options="compat=0.10")
    with open_image(str(v2)) as img:  # version 2 has no dirty bit: nothing written
        img.write(0, [memoryview(b"x" * 512)])
    check_clean(v2)


def test_bad_requests_fail_cleanly(tmp_path: Path) -> None:
    path = make_image(tmp_path / "b.qcow2", "qcow2", size="4M")
    with open_image(str(path)) as img:
        with pytest.raises(OSError) as info:
            img.write(4 * MIB - 512, [memoryview(bytes(1024))])
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            img.read(4 * MIB, [memoryview(bytearray(512))])
    vmdk = make_image(tmp_path / "r.vmdk", "vmdk", size="4M")
    with open_image(str(vmdk)) as img, pytest.raises(OSError) as info:
        img.write(0, [memoryview(bytes(512))])
    assert info.value.errno == errno.EROFS


# -- crash consistency: a writer killed at random moments ------------------------------
WRITER = r"""
import random, sys
from dvmm_blk.formats import open_image
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
img = open_image(path)
block = 4096
n = 0
while True:
    n += 1
    slot = rng.randrange(img.size // block)
    if rng.random() < 0.1:
        first = slot & ~15
        print(f"D {first}", flush=True)  # what is about to happen ...
        img.discard(first * block, 16 * block)
    else:
        print(f"W {slot} {n}", flush=True)
        img.write(slot * block, [memoryview((f"{slot}:{n}:".encode() * block)[:block])])
    print("A", flush=True)  # ... and that it was acknowledged
"""


def block_data(slot: int, n: int) -> bytes:
    return (f"{slot}:{n}:".encode() * 4096)[:4096]


def apply(latest: dict[int, bytes], op: list[str]) -> dict[int, bytes | None]:
    """What ``op`` changes: slot -> its new contents (None: discarded)."""
    if op[0] == "W":
        return {int(op[1]): block_data(int(op[1]), int(op[2]))}
    return {s: None for s in range(int(op[1]), int(op[1]) + 16)}


def run_and_kill(script: Path, path: Path, seed: int, lines: int
                 ) -> tuple[list[list[str]], list[str] | None]:
    """Start the writer, SIGKILL it after ``lines`` lines: the acknowledged
    operations, and the one in flight (if any)."""
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(seed)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = [proc.stdout.readline() for _ in range(lines)]
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate()
    done: list[list[str]] = []
    pending: list[str] | None = None
    for line in [*out, *rest.splitlines()]:
        words = line.split()
        if words == ["A"]:
            assert pending is not None
            done.append(pending)
            pending = None
        elif words:
            pending = words
    return done, pending


def test_killed_writer_leaves_a_consistent_image(tmp_path: Path) -> None:
    """SIGKILL a writing process 20 times: qemu-img check never reports an
    error (leaks are allowed: reported, then reclaimed by the next open) and
    every acknowledged write reads back."""
    path = make_image(tmp_path / "k.qcow2", "qcow2", size="8M", options="cluster_size=4096")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    latest: dict[int, bytes] = {}
    rng = random.Random(20)
    leaks = 0
    for round_ in range(20):
        done, pending = run_and_kill(script, path, round_, rng.randrange(5, 400))
        for op in done:
            for slot, data in apply(latest, op).items():
                if data is None:
                    latest.pop(slot, None)
                else:
                    latest[slot] = data
        check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True,
                               text=True)
        assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaks only
        leaks += check.returncode == 3
        maybe = apply(latest, pending) if pending else {}
        with open_image(str(path), read_only=True) as img:
            for slot in sorted(set(latest) | set(maybe)):
                got = img.read_bytes(slot * 4096, 4096)
                new = maybe.get(slot, latest.get(slot)) if slot in maybe else None
                if slot in maybe and got == (new or bytes(4096)):
                    if new is None:  # the discard in flight happened
                        latest.pop(slot, None)
                    else:
                        latest[slot] = new
                    continue
                assert got == latest.get(slot, bytes(4096)), (round_, slot, got[:16])
    with open_image(str(path)):
        pass  # a read-write open of the dirty image reclaims what the kills leaked
    check_clean(path)
    print(f"{leaks} of 20 kills left leaked clusters")
