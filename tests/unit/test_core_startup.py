"""Start-up of the core (issue 9): only what the first guest instruction needs.

The ``dvmm`` entry point builds the parser of the command being run only,
yet lists every command; ``dvmm run`` imports neither the benchmarks nor the
control clients, psutil, ZeroMQ or the vhost-user stack; the control plane
keeps the events emitted before it opened; the free-memory check reads
/proc/meminfo.  No timing is asserted anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dvmm_core import cli
from dvmm_core.core_control import CoreControl
from dvmm_core.run import check_memory
from dvmm_core.supervisor import Supervisor
from dvmm_shared.cli import UsageError
from dvmm_shared.control import command, runtime_endpoint

#: What ``dvmm run`` must not import before the first guest instruction.
NOT_AT_START = ("dvmm_bench", "dvmm_blk", "dvmm_net", "dvmm_core.guest", "dvmm_core.control_cli",
                "dvmm_core.boot", "dvmm_core.kvm.probe", "dvmm_core.vhost_user_frontend",
                "dvmm_core.virtio_pci", "dvmm_shared.vhost_user", "dvmm_shared.control",
                "dvmm_core.machine.display", "dvmm_core.machine.ramfb", "dvmm_shared.virtio",
                "psutil", "zmq", "msgpack", "subprocess", "tempfile")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def loaded(mods: set[str], prefix: str) -> list[str]:
    return sorted(m for m in mods if m == prefix or m.startswith(prefix + "."))


def test_dvmm_run_imports_only_what_the_machine_needs() -> None:
    mods = modules_after("from dvmm_core import cli\n"
                         "cli.build_parser(['run', '--memory', '32'])\n"
                         "import dvmm_core.run, dvmm_core.machine.pc")
    assert "dvmm_core.run" in mods and "dvmm_core.machine.pc" in mods
    for name in NOT_AT_START:
        assert not loaded(mods, name), f"{name} imported by dvmm run: {loaded(mods, name)}"


def test_help_lists_every_command_with_its_one_line_help() -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for cmd in cli.COMMANDS:
        line = next((ln for ln in out.stdout.splitlines() if ln.split()[:1] == [cmd.name]),
                    None)
        assert line is not None, f"{cmd.name} missing from dvmm --help"
        assert cmd.help.split()[0] in out.stdout


def choices(parser: Any) -> dict[str, str]:
    """Command name -> one-line help, as ``dvmm --help`` shows them."""
    action = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a.help for a in action._choices_actions}


def test_registry_help_is_the_help_each_program_registers() -> None:
    """The lazy entries must say what the full parsers say (no drift)."""
    full = choices(cli.build_parser(None))
    assert full == {c.name: c.help for c in cli.COMMANDS}
    assert choices(cli.build_parser(["run"])) == full


@pytest.mark.parametrize("argv", [["status", "--help"], ["backend", "blk", "--help"],
                                  ["run", "--help"], ["bench", "core", "--help"]])
def test_each_command_still_parses_its_own_options(argv: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert f"usage: dvmm {' '.join(argv[:-1])}" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


# -- the control plane opens late and loses nothing -------------------------------------

def test_events_before_the_control_plane_opens_are_published_in_order(tmp_path: Path) -> None:
    sup = Supervisor(runtime_dir=str(tmp_path))
    control = CoreControl(sup, lambda: [], lambda: "running")
    try:
        assert not (tmp_path / "core.ctl").exists()  # nothing bound before start()
        before = time.time()
        control.emit("backend-started", {"name": "blk0", "pid": 1})
        control.emit("guest-reset", {"reason": "test"})
        early = control.history()
        assert [e["event"] for e in early] == ["backend-started", "guest-reset"]
        control.start()
        control.emit("vm-stopped", {"reason": "x"})
        reply = command(runtime_endpoint(str(tmp_path), "core"), "events", timeout=5)
    finally:
        control.close()
    events = reply["events"]
    assert [e["event"] for e in events] == ["backend-started", "guest-reset", "vm-stopped"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[0]["name"] == "blk0" and before <= events[0]["ts"] <= events[1]["ts"]
    assert events[0]["ts"] == early[0]["ts"]  # the time it happened, not when published


def test_events_after_close_are_dropped(tmp_path: Path) -> None:
    control = CoreControl(Supervisor(runtime_dir=str(tmp_path)), lambda: [], lambda: "x")
    control.close()
    control.emit("late", {})
    assert control.history() == []


# -- free memory without psutil -------------------------------------------------------------

def meminfo(tmp_path: Path, avail_kib: int, swap_kib: int) -> str:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {avail_kib} kB\n"
                    f"SwapTotal: 0 kB\nSwapFree: {swap_kib} kB\n")
    return str(path)


def test_memory_check_counts_available_ram_and_free_swap(tmp_path: Path) -> None:
    check_memory(3 << 20, meminfo(tmp_path, 2048, 1024))  # 3 MiB = 2 + 1
    with pytest.raises(UsageError, match="more than the host can give"):
        check_memory((3 << 20) + 4096, meminfo(tmp_path, 2048, 1024))


def test_memory_check_without_meminfo_lets_the_allocation_decide(tmp_path: Path) -> None:
    check_memory(1 << 40, str(tmp_path / "missing"))
    (tmp_path / "garbage").write_text("MemAvailable: lots\n")
    check_memory(1 << 40, str(tmp_path / "garbage"))
