"""``dvmm run --config`` and ``dvmm config dump``: the file, the merge, the errors.

Everything goes through ``dvmm run``'s real parser (as ``dvmm config dump``
builds it); no VM is started.  The boot comparison (file vs flags) is in
tests/core/test_qmp_config.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dvmm_core import run
from dvmm_core.config_dump import to_toml
from dvmm_core.config_file import Unset, UnsetList
from dvmm_core.supervisor import RestartPolicy
from dvmm_shared.cli import UsageError


def parse(*argv: str) -> argparse.Namespace:
    parent = argparse.ArgumentParser()
    sub = parent.add_subparsers(dest="command")
    run.add_parser(sub)
    return run.resolve_args(parent.parse_args(["run", *argv]))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def write(tmp_path: Path, text: str, name: str = "vm.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_is_given() -> None:
    args = parse()
    assert args.memory == 256 and args.cpus == 1 and args.disk == [] and args.standby is True
    assert args.restart is RestartPolicy.ON_FAILURE and args.restart_limit == (10, 60.0)
    assert not any(isinstance(v, Unset | UnsetList) for v in vars(args).values())


def test_the_file_sets_what_the_flags_set(tmp_path: Path, image: Path) -> None:
    cfg = write(tmp_path, f"""
name = "web"
[machine]
memory = 512
cpus = 2
[boot]
menu = 100
menu-key = "f12"
[backends]
restart = "always"
restart-limit = "3/10"
standby = false
[serial]
output = "file:serial.log"
[qmp]
listen = ["unix:vm.qmp", "tcp:127.0.0.1:4444"]
[[disk]]
image = "{image.name}"
read-only = true
restart = "never"
[[disk]]
socket = "/run/qsd.sock"
[[net]]
peer = "link.sock"
mac = "52:54:00:00:00:01"
queues = 2
[display]
vnc = "127.0.0.1:5901"
""")
    args = parse("--config", cfg)
    assert (args.name, args.memory, args.cpus, args.boot_menu) == ("web", 512, 2, 100)
    assert args.restart is RestartPolicy.ALWAYS and args.restart_limit == (3, 10.0)
    assert args.standby is False and args.boot_menu_key == "f12"
    # Relative paths are the file's directory's.
    assert args.serial == f"file:{tmp_path}/serial.log"
    assert args.qmp == [f"unix:{tmp_path}/vm.qmp", "tcp:127.0.0.1:4444"]
    assert args.disk == [f"{image},read-only,restart=never"]
    assert args.vhost_user_blk == ["/run/qsd.sock"]
    assert args.net == [f"peer={tmp_path}/link.sock,mac=52:54:00:00:00:01,queues=2"]
    assert args.display == "vnc=127.0.0.1:5901"
    cfg_obj = run.build_config(args)
    assert cfg_obj.disks[0].read_only and cfg_obj.disks[1].socket == "/run/qsd.sock"


def test_flags_override_the_file_even_when_equal_to_the_default(tmp_path: Path,
                                                               image: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    cfg = write(tmp_path, f'[machine]\nmemory = 512\ncpus = 4\n[[disk]]\nimage = "{image}"\n'
                '[[disk]]\nsocket = "/run/x.sock"\n[backends]\nstandby = false\n')
    args = parse("--config", cfg, "--memory", "256", "--disk", str(other), "--no-standby")
    assert args.memory == 256 and args.cpus == 4   # 256 is the default, still the flag's
    assert args.disk == [str(other)] and args.vhost_user_blk == []  # disks as a whole
    assert args.standby is False


@pytest.mark.parametrize(("text", "message"), [
    ("[machine]\nmemroy = 5\n", "vm.toml: machine.memroy: unknown key"),
    ("[machine]\nmemory = \"lots\"\n", "vm.toml: machine.memory: expected an integer, got 'lots'"),
    ("[machine]\nmemory = 8\n", "vm.toml: machine.memory: must be 16.."),
    ("[machine]\ncpus = true\n", "vm.toml: machine.cpus: expected an integer"),
    ("[backends]\nrestart = \"sometimes\"\n", "vm.toml: backends.restart: unknown restart policy"),
    ("[backends]\nrestart-limit = \"x\"\n", "vm.toml: backends.restart-limit: 'x' is not N/SEC"),
    ("[[disk]]\nimage = \"nope.img\"\n", "vm.toml: disk[0].image: no such file"),
    ("[[disk]]\nread-only = true\n", "vm.toml: disk[0]: give exactly one of image= or socket="),
    ("[[disk]]\nimage = \"disk.img\"\nwrite-back = 1\n", "vm.toml: disk[0].write-back: unknown"),
    ("[[net]]\ntap = \"t0\"\nqueues = 99\n", "vm.toml: net[0]: bad option 'queues=99'"),
    ("[display]\nvnc = \"x\"\n", "vm.toml: display: vnc= needs HOST:PORT"),
    ("[qmp]\nlisten = \"unix:x\"\n", "vm.toml: qmp.listen: expected a list of strings"),
    ("disk = 3\n", "vm.toml: disk: expected [[disk]] tables"),
    ("colour = 3\n", "vm.toml: colour: unknown key"),
    ("machine = 3\n", "vm.toml: machine: expected a table [machine]"),
    ("[machine\n", "vm.toml: not valid TOML: Expected ']'"),
    ("name = \"a\\u0000b\"\n", "vm.toml: name: contains a NUL character"),
])
def test_bad_files_are_one_line_naming_the_key(tmp_path: Path, image: Path, text: str,
                                               message: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(UsageError) as err:
        parse("--config", cfg)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(str(tmp_path)) and message in line.replace(f"{tmp_path}/", ""), line


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--config .*nope\.toml: No such file"):
        parse("--config", str(tmp_path / "nope.toml"))


def test_dump_reads_back_to_the_same_text(tmp_path: Path, image: Path) -> None:
    flags = ["--disk", f"{image},read-only,restart=always", "--vhost-user-blk", "/run/q.sock",
             "--net", "tap=tap0,queues=2", "--memory", "512", "--qmp", "unix:q.sock",
             "--display", "vnc=127.0.0.1:5900,gpu=virtio", "--name", "x", "--restart", "never",
             "--boot-menu", "--serial", "none"]
    text = to_toml(parse(*flags))
    tomllib.loads(text)  # valid TOML
    cfg = write(tmp_path, text, "dumped.toml")
    again = to_toml(parse("--config", cfg))
    assert again == text
    assert to_toml(parse("--config", cfg, "--cpus", "3")) == text.replace("cpus = 1", "cpus = 3")
    assert run.build_config(parse("--config", cfg)) == run.build_config(parse(*flags))


def test_dvmm_config_dump_command(tmp_path: Path, image: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "config", "dump", "--disk",
                          str(image), "--cpus", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads(out.stdout)
    assert doc["machine"]["cpus"] == 2 and doc["disk"] == [{"image": str(image)}]
    bad = write(tmp_path, "[machine]\ncpus = 0\n")
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "config", "dump", "--config",
                          bad], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "machine.cpus: must be 1..64, not 0" in out.stderr
