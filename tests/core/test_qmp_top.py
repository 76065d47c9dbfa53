"""``dvmm top`` against a running dvmm core (issue 11): the VM and every backend,
with non-zero RSS and CPU, from the control plane; the live view ends cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

from corevm import CoreVM, dvmm_argv, wait_until
from dvmm_core.boot.counter import BOOTED, make_counter_disk

SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)$")


def size(text: str) -> float:
    m = SIZE.match(text)
    assert m, f"not a size: {text!r}"
    return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def test_firmware_top_once_shows_vm_and_backends(tmp_path: Path) -> None:
    disks = [make_counter_disk(tmp_path / f"d{i}.img") for i in range(2)]
    with CoreVM(tmp_path, ["--disk", str(disks[0]), "--disk", str(disks[1])]) as vm:
        vm.wait_serial(BOOTED, timeout=90)
        assert vm.proc is not None
        out = subprocess.run(dvmm_argv("top", "--once", "--interval", "0.3", "--pid",
                                       str(vm.proc.pid)), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        head = re.search(r"VM pid (\d+)\s+running .* core RSS (\S+)\s+CPU ([\d.]+)s", text)
        assert head and int(head.group(1)) == vm.proc.pid, text
        assert size(head.group(2)) > 0 and float(head.group(3)) > 0
        for name in ("blk0", "blk1"):
            row = [c.strip() for c in next(line for line in text.splitlines()
                                          if f" {name} " in line).split("│")[1:-1]]
            assert row[2] == "running" and row[3] == "connected", row
            assert size(row[5]) > 0, row                         # RSS
            assert float(row[6].split("s")[0]) > 0, row          # CPU seconds
            assert row[7].startswith("r "), row                  # blk I/O counters
        assert vm.stop() == 0


def test_firmware_top_live_view_ends_on_sigterm(tmp_path: Path) -> None:
    disk = make_counter_disk(tmp_path / "d.img")
    with CoreVM(tmp_path, ["--disk", str(disk)]) as vm:
        vm.wait_serial(BOOTED, timeout=90)
        assert vm.proc is not None
        out_path = tmp_path / "top.out"
        with open(out_path, "wb") as out:
            top = subprocess.Popen(dvmm_argv("top", "--interval", "0.2", "--pid",
                                             str(vm.proc.pid)), stdout=out,
                                   stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: out_path.read_bytes().count(b"blk0") >= 2, 60,
                           "two refreshes of dvmm top", top)
            finally:
                top.send_signal(signal.SIGTERM)
                rc = top.wait(timeout=30)
        assert rc == 0, out_path.read_text()
        assert "Traceback" not in out_path.read_text()
        assert vm.stop() == 0


def test_top_without_a_vm_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(dvmm_argv("top", "--once", "--vm", str(tmp_path / "none")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == f"dvmm: error: no VM runtime directory {tmp_path / 'none'}"
