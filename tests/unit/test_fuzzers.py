"""``dvmm chaos fuzz``: every hostile-frontend fuzzer runs 30 s without a crash.

Each target fuzzes the real backend code (vhost-user daemons of blk, net and
display, the blk and net devices' ring service, the virtio-gpu device, the
QMP session) in a child process under libFuzzer; the runner must see inputs
executed, coverage fed back, and no crash.  The deliberately crashing
``selftest-crash`` target proves a crash is reported (exit 1, the input
saved), so these tests can fail.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvmm_core.chaos.fuzz import TARGETS, runner

FUZZERS = [t.name for t in TARGETS.values() if not t.hidden]
CLI = [sys.executable, "-m", "dvmm_core.cli", "chaos", "fuzz"]


def _tail(path: str, lines: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", FUZZERS)
def test_thirty_seconds_of_fuzzing_find_no_crash(name: str, tmp_path: Path) -> None:
    r = runner.run(name, tmp_path / "corpus", tmp_path / "artifacts", seconds=30, seed=14)
    assert r.crashes == 0 and r.exit_code == 0, \
        f"{r.summary()}\n{r.artifacts}\n{_tail(r.log)}"
    assert r.runs > 100, r.summary()
    assert r.cov > 0 and r.features > 0, r.summary()  # coverage reaches libFuzzer
    assert r.corpus > 0, r.summary()
    assert 0 < r.peak_rss_mb < runner.RSS_LIMIT_MB, r.summary()


@pytest.mark.timeout(120)
def test_a_crash_is_reported_with_its_input(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    out = subprocess.run([*CLI, "selftest-crash", "--time", "30", "--seed", "1",
                          "--artifacts", str(art), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=110)
    assert out.returncode == 1, out.stdout + out.stderr
    summary = out.stdout.splitlines()[0]
    assert summary.startswith("selftest-crash:") and "crashes 1/" in summary
    assert "CRASH: inputs" in out.stdout
    crashes = list(art.glob("crash-*"))
    assert len(crashes) == 1 and crashes[0].read_bytes()[:1] == b"C"
    log = (art / "selftest-crash.log").read_text()
    assert "SelfTestCrash: deliberate crash" in log
    assert '"crashes": 1' in (tmp_path / "r.json").read_text()


def test_list_shows_the_fuzzers_but_not_the_self_test() -> None:
    out = subprocess.run([*CLI, "--list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines()]
    assert listed == FUZZERS
    assert {"vhost-user-blk", "vhost-user-net", "vhost-user-display", "virtqueue-blk",
            "virtio-gpu", "qmp"} <= set(listed)


@pytest.mark.parametrize("args, message", [
    (["no-such-target"], "unknown target 'no-such-target'"),
    ([], "name a TARGET"),
    (["qmp", "--time", "0"], "--time must be positive"),
])
def test_bad_arguments_are_one_line_errors(args: list[str], message: str) -> None:
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_libfuzzer_figures_are_read_from_its_output() -> None:
    out = (b"#2048\tpulse  cov: 10 ft: 20 corp: 5/100b lim: 4 exec/s: 1000 rss: 40Mb\n"
           b"#4096\tDONE   cov: 12 ft: 25 corp: 6/120b lim: 4 exec/s: 1024 rss: 41Mb\n"
           b"stat::number_of_executed_units: 4096\nstat::average_exec_per_sec:     1024\n"
           b"stat::peak_rss_mb:              41\n")
    r = runner.parse("t", out, 4.0, 0)
    assert (r.runs, r.execs_per_s, r.cov, r.features, r.peak_rss_mb, r.crashes) == \
        (4096, 1024, 12, 25, 41, 0)
    assert runner.parse("t", out, 4.0, 77).crashes == 1  # a non-zero exit is a crash


@pytest.mark.timeout(120)
def test_sigterm_stops_the_fuzzing_child(tmp_path: Path) -> None:
    import psutil

    proc = subprocess.Popen([*CLI, "qmp", "--time", "100", "--artifacts", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:
            children = parent.children(recursive=True)
            time.sleep(0.1)  # polling for the child to be started, bounded by the deadline
        assert children, "the fuzzing child never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
