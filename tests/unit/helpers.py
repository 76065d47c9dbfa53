"""Helpers shared by the unit tests.

Guest memory made of memfd regions, a driver/device ring pair over it, a
tiny echo device for exercising the vhost-user daemon in a thread, the blk
backend as a subprocess, and small process/fd utilities.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvmm_shared.chain import ChainReader, ChainWriter
from dvmm_shared.driver import Buf, DriverQueue, ring_layout
from dvmm_shared.memory import GuestMemory, buffer_address, memfd_region
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.vhost_user.backend import VhostUserBackend
from dvmm_shared.vhost_user.connection import Connection
from dvmm_shared.vhost_user.daemon import Daemon
from dvmm_shared.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)
from dvmm_shared.virtqueue import DescriptorChain, SplitQueue

# The standard test memory: two adjacent 64 KiB regions (A then B, so a range
# can straddle them), a gap, then a small region C.
REGION_A = (0x0, 0x10000)
REGION_B = (0x10000, 0x10000)
REGION_C = (0x100000, 0x1000)
RING_BASE = 0x1000
BUF_BASE = 0x4000


def make_memory(*layout: tuple[int, int]) -> GuestMemory:
    """Guest memory with one memfd region per ``(guest_addr, size)``."""
    mem = GuestMemory()
    for gpa, size in layout:
        fd, region = memfd_region(size, guest_addr=gpa)
        os.close(fd)  # the mapping keeps the memory alive
        mem.add(region)
    return mem


def standard_memory() -> GuestMemory:
    return make_memory(REGION_A, REGION_B, REGION_C)


def view_in_memory(mem: GuestMemory, view: memoryview) -> bool:
    """Whether ``view`` lies inside one mapped region (by process address)."""
    if not len(view):
        return True
    addr = buffer_address(view)
    return any(r.user_addr <= addr and addr + len(view) <= r.user_addr + r.size for r in mem)


@dataclass
class RingPair:
    """The driver side and the device side of one ring over the same memory."""

    mem: GuestMemory
    driver: DriverQueue
    device: SplitQueue
    next_free: int = BUF_BASE

    def alloc(self, size: int, data: bytes | None = None) -> int:
        """A buffer in region A (16-byte aligned), optionally filled."""
        addr = self.next_free
        self.next_free = (addr + size + 15) & ~15
        if self.next_free > REGION_A[1]:
            raise MemoryError("ring pair is out of buffer space")
        if data is not None:
            self.mem.write(addr, data)
        return addr


def ring_pair(size: int = 8, *, event_idx: bool = False, indirect: bool = True) -> RingPair:
    mem = standard_memory()
    layout = ring_layout(RING_BASE, size)
    driver = DriverQueue(mem, layout, event_idx=event_idx)
    device = SplitQueue(mem, layout, event_idx=event_idx, indirect=indirect)
    return RingPair(mem, driver, device)


# -- a device for the daemon tests --------------------------------------------
ECHO_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(
    VIRTIO_F_RING_INDIRECT_DESC)
ECHO_CONFIG = b"echo-config-space".ljust(32, b"\0")


@dataclass
class EchoBackend(VhostUserBackend):
    """Writes the chain's readable bytes back, reversed, into its writable part."""

    queues: int = 2
    chains: list[tuple[int, int]] = field(default_factory=list)
    acked_features: int | None = None
    resets: int = 0

    @property
    def num_queues(self) -> int:
        return self.queues

    def features(self) -> int:
        return ECHO_FEATURES

    def set_features(self, features: int) -> None:
        self.acked_features = features

    def get_config(self, offset: int, size: int) -> bytes:
        return ECHO_CONFIG[offset:offset + size]

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        reader, writer = ChainReader(chain.readable), ChainWriter(chain.writable)
        data = reader.read(min(reader.remaining, writer.remaining))
        writer.write(data[::-1])
        self.chains.append((queue_index, chain.head))
        return len(data)

    def reset(self) -> None:
        self.resets += 1


class DaemonThread:
    """A real :class:`Daemon` serving in a thread of the test process."""

    def __init__(self, backend: VhostUserBackend, path: Path) -> None:
        self.path = str(path)
        self.daemon = Daemon(backend, self.path)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vhost-daemon", daemon=True)

    def _run(self) -> None:
        try:
            self.daemon.serve_forever()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> DaemonThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.daemon.stop()
            self.thread.join(10)
        if self.thread.is_alive():
            raise RuntimeError("daemon thread did not stop")
        if self.error is not None:
            raise RuntimeError(f"daemon thread died: {self.error!r}") from self.error


def wait_closed(conn: Connection, timeout: float = 5.0) -> bool:
    """Whether the peer closed the connection (True) within ``timeout``."""
    conn.sock.settimeout(timeout)
    try:
        while True:
            data = conn.sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def echo(vm: SyntheticVM, ring: int, data: bytes, *, indirect: bool = False) -> bytes:
    """One request through ring ``ring``; returns what the device wrote back."""
    src = vm.alloc(len(data), align=16)
    vm.mem.write(src, data)
    dst = vm.alloc(len(data), align=16)
    table = vm.alloc(32, align=16) if indirect else None
    r = vm.rings[ring]
    head = r.queue.add([Buf(src, len(data)), Buf(dst, len(data), write=True)], indirect_at=table)
    r.kick_if_needed()
    assert r.wait_used() == [(head, len(data))]
    return vm.mem.read(dst, len(data))


# -- the blk backend as a subprocess --------------------------------------------
BLK_PROG = [sys.executable, "-m", "dvmm_blk"]
ERROR_PREFIX = "dvmm backend blk: error:"


def _socket_identity(path: Path) -> tuple[int, int] | None:
    """(inode, ctime) of a socket file: inode numbers alone are reused at once."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | subprocess.Popen[str],
                    timeout: float = 10.0, stale: tuple[int, int] | None = None) -> None:
    """Bounded poll until the backend has bound its socket (or died).

    ``stale`` identifies a socket file that was there before the start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _socket_identity(path) not in (None, stale):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode} before listening")
        time.sleep(0.01)
    raise TimeoutError(f"backend did not create {path} in {timeout} s")


@dataclass
class BlkProcess:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def blk_backend(tmp_path: Path, image: Path, *args: str) -> Iterator[BlkProcess]:
    """Run ``python -m dvmm_blk`` on ``image``; terminated (SIGTERM) on exit."""
    sock = tmp_path / "blk.sock"
    log = tmp_path / "blk.log"
    stale = _socket_identity(sock)
    with open(log, "wb") as err:
        proc = subprocess.Popen([*BLK_PROG, "--socket", str(sock), "--image", str(image),
                                 *args], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_for_socket(sock, proc, stale=stale)
        yield BlkProcess(proc, sock, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


def run_blk(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BLK_PROG, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def make_image(path: Path, size: int, pattern: bool = True) -> Path:
    """A raw image; with ``pattern`` every sector holds its number in its first bytes."""
    data = bytearray(size)
    if pattern:
        for sector in range(size // 512):
            data[sector * 512:sector * 512 + 8] = sector.to_bytes(8, "little")
            data[sector * 512 + 8:sector * 512 + 512] = bytes([sector & 0xFF]) * 504
    path.write_bytes(bytes(data))
    return path


class EventRecorder:
    """An event sink (``(event, fields)``, as the core's supervisor and links
    call it) that a test can wait on."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        with self.cond:
            self.items.append((event, fields))
            self.cond.notify_all()

    def names(self) -> list[str]:
        with self.cond:
            return [e for e, _ in self.items]

    def wait_for(self, event: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        """The fields of the ``count``-th ``event``, once it happened."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: [e for e, _ in self.items].count(event) >= count, timeout)
            assert ok, f"waited for {count} x {event}; got {[e for e, _ in self.items]}"
            return [f for e, f in self.items if e == event][count - 1]
