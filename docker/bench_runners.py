"""Start-up cost of each backend runner against the plain process (issue 12).

    python docker/bench_runners.py [--runs N]      (DOCKER_HOST set: Docker too)

For each runner, N times: the core's supervisor starts a dvmm blk backend
(warm standby off, the image handed as the runner hands it) and the time
from the spawn to the vhost-user socket listening is taken, then the
backend's RSS (psutil, its own host pid), then it is stopped.  Printed: the
median and min/max per runner, and the ratio of each median to the plain
process runner's median measured in the same invocation.  A benchmark, not
a test: no threshold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from dvmm_core.runners import RunnerKind, make_runner
from dvmm_core.runners_resources import disk_args
from dvmm_core.supervisor import RestartPolicy, RestartSpec, Supervisor


def one_start(kind: RunnerKind, image: Path, work: Path) -> tuple[float, int]:
    runtime = Path(tempfile.mkdtemp(dir=work))
    sup = Supervisor(runtime_dir=str(runtime))
    try:
        runner = make_runner(kind)
        args = disk_args(runner, str(image), False)
        t0 = time.monotonic()
        backend = sup.spawn_python("blk0", "dvmm_blk", [*args, "-q"], control=True,
                                   restart=RestartSpec(RestartPolicy.NEVER), runner=runner)
        sup.wait_for_socket(backend, timeout=120)
        elapsed = time.monotonic() - t0
        rss = psutil.Process(backend.pid).memory_info().rss
        return elapsed, rss
    finally:
        sup.stop_all()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    kinds = [RunnerKind.PROCESS, RunnerKind.BWRAP]
    if os.environ.get("DOCKER_HOST"):
        kinds.append(RunnerKind.DOCKER)
    with tempfile.TemporaryDirectory(prefix="dvmm-bench-runners-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        image.write_bytes(bytes(1 << 20))
        results = {k: [one_start(k, image, work) for _ in range(args.runs)] for k in kinds}
    base = statistics.median(t for t, _ in results[RunnerKind.PROCESS])
    print(f"{'runner':8} {'spawn->listening ms (median, min-max)':38} {'ratio':>6} "
          f"{'RSS MiB':>8}")
    for kind, runs in results.items():
        times = [t for t, _ in runs]
        rss = statistics.median(r for _, r in runs) / (1 << 20)
        med = statistics.median(times)
        print(f"{kind.value:8} {med * 1000:8.0f} ({min(times) * 1000:.0f}-"
              f"{max(times) * 1000:.0f}){'':22} {med / base:6.2f} {rss:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
