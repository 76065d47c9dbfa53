"""The dvmm core boots SeaBIOS from a qcow2 disk whose backing file is raw (issue 13).

``dvmm run --disk IMG.qcow2``: the blk backend detects the format, reads the
demo boot program and payload through the qcow2 image from its raw backing
file, and the boot program's checksum of what SeaBIOS read is the raw
disk's.  A second run writes nothing to the base: the raw file is unchanged
and the qcow2 image checks clean.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from corevm import CoreVM
from dvmm_core.boot.demo import make_demo_disk, parse_demo_output

SECTORS = 2048


def test_firmware_boots_qcow2_over_raw_backing(tmp_path: Path) -> None:
    demo = make_demo_disk(tmp_path / "base.img", payload_sectors=SECTORS, seed=11)
    base_digest = hashlib.sha256(demo.path.read_bytes()).hexdigest()
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", demo.path.name, "-F", "raw",
                    str(top)], check=True)
    with CoreVM(tmp_path, ["--firmware", "seabios", "--disk", str(top)]) as vm:
        result = parse_demo_output(vm.wait_serial("dvmm-demo: done", timeout=90))
        assert result is not None and result.checksum == demo.checksum, vm.diagnostics()
        assert result.sectors == SECTORS
        assert vm.stop() == 0
    assert hashlib.sha256(demo.path.read_bytes()).hexdigest() == base_digest
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
