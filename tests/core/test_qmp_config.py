"""A VM described by a TOML file boots exactly as the same VM given by flags
(issue 11): the demo disk's serial logs are compared whole; a bad file is a
one-line error naming the key, before anything starts."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from corevm import CoreVM, dvmm_argv, wait_until
from dvmm_core.boot.demo import make_demo_disk
from qemu.qmp import QMPClient


def boot_log(workdir: Path, args: list[str]) -> str:
    workdir.mkdir()
    with CoreVM(workdir, args) as vm:
        vm.wait_serial("dvmm-demo: done", timeout=120)
        log = vm.serial()
        assert vm.stop() == 0, vm.diagnostics()
    return log


def test_firmware_toml_file_boots_like_the_flags(tmp_path: Path) -> None:
    disk = make_demo_disk(tmp_path / "demo.img", payload_sectors=64, after="halt")
    flags = boot_log(tmp_path / "flags", ["--memory", "128", "--cpus", "2", "--disk",
                                          f"{disk.path},read-only", "--restart", "never"])
    config = tmp_path / "vm.toml"
    config.write_text('[machine]\nmemory = 128\ncpus = 2\n[backends]\nrestart = "never"\n'
                      '[[disk]]\nimage = "demo.img"\nread-only = true\n')
    from_file = boot_log(tmp_path / "file", ["--config", str(config)])
    assert "dvmm-demo: done" in from_file
    assert from_file == flags


def test_firmware_qmp_socket_from_the_file(tmp_path: Path) -> None:
    disk = make_demo_disk(tmp_path / "demo.img", payload_sectors=16, after="halt")
    config = tmp_path / "vm.toml"
    config.write_text('name = "from-file"\n[qmp]\nlisten = ["unix:vm.qmp"]\n'
                      f'[[disk]]\nimage = "{disk.path.name}"\n')
    sock = tmp_path / "vm.qmp"

    async def ask() -> object:
        qmp = QMPClient("cfg")
        await qmp.connect(str(sock))
        try:
            return await qmp.execute("query-name")
        finally:
            await qmp.disconnect()

    with CoreVM(tmp_path, ["--config", str(config)]) as vm:
        wait_until(sock.exists, 60, "the QMP socket named in the file", vm.proc, vm.diagnostics)
        assert asyncio.run(ask()) == {"name": "from-file"}
        assert vm.stop() == 0


def test_bad_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[machine]\nmemory = 64\ncpus = \"two\"\n")
    out = subprocess.run(dvmm_argv("run", "--config", str(config)), capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"dvmm: error: {config}: machine.cpus: expected an integer, "
                                  "got 'two'")
