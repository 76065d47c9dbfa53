"""Run one fuzz target in a child process, bounded, and report what it did.

Owns the parent's side: the libFuzzer command line of :mod:`.run` (time or
run budget, corpus directory, seed, ``-rss_limit_mb``/``-malloc_limit_mb``,
a per-input ``-timeout``, ``-artifact_prefix`` where a crashing input is
saved), a wall-clock bound on the child (stopped by its pid), the child's
peak RSS (psutil, every half second, and libFuzzer's own figure), and the
figures read from libFuzzer's output: executed inputs, inputs per second,
coverage (``cov``: edges, ``ft``: features) and the corpus size.  A crash is
the child exiting non-zero or leaving an artifact; its last output lines
(the traceback) and the saved input are kept in the artifact directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

RSS_LIMIT_MB = 2048
MALLOC_LIMIT_MB = 1024
INPUT_TIMEOUT_S = 20   # one input running longer is a hang
MAX_LEN = 4096
GRACE_S = 90           # start-up and the final stats, past the time budget

_STATUS = re.compile(rb"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)
_STAT = re.compile(rb"^stat::(\w+):\s+(\d+)", re.M)


@dataclass
class FuzzResult:
    target: str
    seconds: float
    runs: int = 0
    execs_per_s: int = 0
    cov: int = 0
    features: int = 0
    corpus: int = 0
    peak_rss_mb: int = 0
    exit_code: int = 0
    crashes: int = 0
    artifacts: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.crashes == 0

    def summary(self) -> str:
        return (f"{self.target}: {self.runs} runs in {self.seconds:.0f} s, "
                f"{self.execs_per_s} exec/s, cov {self.cov} ft {self.features}, "
                f"corpus {self.corpus}, peak RSS {self.peak_rss_mb} MB, "
                f"crashes {self.crashes}/{self.runs}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def command(target: str, corpus: Path, artifacts: Path, *, seconds: float | None,
            runs: int | None, seed: int | None, rss_limit_mb: int = RSS_LIMIT_MB) -> list[str]:
    cmd = [sys.executable, "-m", "dvmm_core.chaos.fuzz.run", target,
           f"-rss_limit_mb={rss_limit_mb}", f"-malloc_limit_mb={MALLOC_LIMIT_MB}",
           f"-timeout={INPUT_TIMEOUT_S}", f"-max_len={MAX_LEN}", "-len_control=0",
           "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/"]
    if seconds is not None:
        cmd.append(f"-max_total_time={max(1, round(seconds))}")
    if runs is not None:
        cmd.append(f"-runs={runs}")
    if seed is not None:
        cmd.append(f"-seed={seed}")
    return [*cmd, str(corpus)]


def run(target: str, corpus: Path, artifacts: Path, *, seconds: float | None = 60,
        runs: int | None = None, seed: int | None = None,
        rss_limit_mb: int = RSS_LIMIT_MB) -> FuzzResult:
    """Fuzz ``target`` until the budget is spent or it crashes."""
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    work = artifacts / "work"
    work.mkdir(exist_ok=True)
    log_path = artifacts / f"{target}.log"
    cmd = command(target, corpus, artifacts, seconds=seconds, runs=runs, seed=seed,
                  rss_limit_mb=rss_limit_mb)
    env = {**os.environ, "DVMM_FUZZ_WORK": str(work)}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            peak = _watch(child, None if seconds is None else seconds + GRACE_S)
        finally:
            if child.poll() is None:  # interrupted, or past its bound: ours to stop
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    result = parse(target, log_path.read_bytes(), time.monotonic() - started, child.returncode)
    result.peak_rss_mb = max(result.peak_rss_mb, peak)
    result.corpus = len(list(corpus.iterdir()))
    result.artifacts = sorted(str(p) for p in artifacts.iterdir()
                              if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak",
                                                          "slow"))
    result.crashes = max(result.crashes, len([a for a in result.artifacts
                                              if "slow-unit" not in a]))
    result.log = str(log_path)
    _clean(work)
    return result


def _watch(child: subprocess.Popen[bytes], bound: float | None) -> int:
    """Wait for the child, sampling its RSS; SIGKILL it past ``bound`` seconds."""
    deadline = None if bound is None else time.monotonic() + bound
    peak = 0
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss >> 20)
        except psutil.Error:
            pass
        if deadline is not None and time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        try:
            child.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
    return peak


def parse(target: str, out: bytes, seconds: float, exit_code: int) -> FuzzResult:
    """The figures of a libFuzzer run from its output."""
    r = FuzzResult(target, seconds, exit_code=exit_code)
    statuses = _STATUS.findall(out)
    if statuses:
        last = statuses[-1]
        r.runs, r.cov, r.features = int(last[0]), int(last[1]), int(last[2])
    stats = {k.decode(): int(v) for k, v in _STAT.findall(out)}
    r.runs = max(r.runs, stats.get("number_of_executed_units", 0))
    r.execs_per_s = stats.get("average_exec_per_sec", 0) or (
        round(r.runs / seconds) if seconds else 0)
    r.peak_rss_mb = stats.get("peak_rss_mb", 0)
    if exit_code != 0:
        r.crashes = 1
    return r


def _clean(work: Path) -> None:
    for path in sorted(work.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    work.rmdir()
