"""Small static C tools for the test guest, for what busybox lacks.

Owns compiling them (``gcc -static``) into the initramfs root.  Today:
``blkzero`` (BLKZEROOUT, i.e. virtio-blk WRITE_ZEROES from the guest) and
``blkverify`` (writes, flushes and re-reads numbered, checksummed blocks with
O_DIRECT from several threads: the crash-recovery tests' workload) and
``netverify`` (a sequenced, checksummed TCP stream both ways: the chaos
campaigns' net workload).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .debian import GuestBuildError

TOOLS = {"blkzero": "blkzero.c", "blkverify": "blkverify.c", "netverify": "netverify.c"}


def sources() -> list[bytes]:
    """The tool sources, for the cache key."""
    return [(Path(__file__).parent / src).read_bytes() for src in TOOLS.values()]


def install_tools(root: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestBuildError("gcc is needed to build the guest's tools "
                              "(apt-get install gcc libc6-dev)")
    for name, src in TOOLS.items():
        out = root / "bin" / name
        proc = subprocess.run([gcc, "-static", "-Os", "-s", "-pthread", "-o", str(out),
                               str(Path(__file__).parent / src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise GuestBuildError(f"cannot build guest tool {name}: {last}")
