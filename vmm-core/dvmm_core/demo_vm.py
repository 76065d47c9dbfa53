"""``dvmm demo``: the built-in default VM.

Owns choosing and running the default VM.  On a host that runs guest
kernel code at hardware speed it would be the Debian Linux guest with a dvmm
blk disk; on hosts like kvm_pvm (guest kernel code emulated in software,
measured by the probe) it is SeaBIOS booting the demo disk: a boot program
assembled from source that reads 1 MiB of its disk through BIOS int 13h,
served by a dvmm blk backend process over vhost-user, and prints a
checksum.  While the guest reads, the demo SIGKILLs the backend a few times
(``--kills``): the supervisor restarts it, the core replays the device and
the requests in flight, and the checksum must still match.  The command
stops the VM when the program is done and compares the checksum with the
host's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dvmm_shared.cli import UsageError, add_logging_args, setup_logging

from .boot.demo import DemoDisk, make_demo_disk, parse_demo_output
from .kvm import probe_host
from .machine.pc import DiskSpec, Machine, MachineConfig
from .run import SEABIOS, backend_log_args, start_machine

log = logging.getLogger("dvmm.demo")

DONE = b"dvmm-demo: done"
BOOTED = b"dvmm-demo: booted"
#: Between two kills: long enough for the warm standby to be ready again.
KILL_INTERVAL = 1.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run the built-in default VM",
        description="Boot the built-in default VM on the dvmm core: SeaBIOS loads a "
        "demo disk served by a dvmm blk backend process; its boot program reads the "
        "disk through int 13h and prints a checksum, which is compared with the host's.")
    p.add_argument("--sectors", type=int, default=12288,
                   help="payload sectors the boot program reads (default 12288 = 6 MiB)")
    p.add_argument("--kills", type=int, default=3,
                   help="SIGKILL the blk backend this many times while the guest reads, "
                        f"{KILL_INTERVAL} s apart (default 3; 0 for none)")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="give up after this many seconds (default 120)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the demo disk is written (default: the dvmm cache)")
    add_logging_args(p)
    p.set_defaults(func=run)


def _work_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    base = os.environ.get("DVMM_CACHE") or os.environ.get("XDG_CACHE_HOME") or \
        os.path.expanduser("~/.cache")
    return Path(base) / "dvmm" / "demo"


def run(args: argparse.Namespace) -> int:
    setup_logging("dvmm", args.verbose, args.quiet)
    probe = probe_host()
    print(f"dvmm demo: host probe: {probe.reason}", file=sys.stderr)
    work = _work_dir(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    disk = make_demo_disk(work / "demo.img", payload_sectors=args.sectors)
    if args.kills < 0:
        raise UsageError(f"--kills must be 0 or more, not {args.kills}")
    return run_firmware_demo(disk, args.cpus, args.timeout, backend_log_args(args),
                             args.kills)


def run_firmware_demo(disk: DemoDisk, cpus: int, timeout: float,
                      backend_args: list[str], kills: int = 0) -> int:
    if not os.path.isfile(SEABIOS):
        raise UsageError(f"{SEABIOS} is missing (apt-get install seabios)")
    seen = bytearray()
    done, booted = threading.Event(), threading.Event()

    def sink(data: bytes) -> None:
        os.write(1, data)
        seen.extend(data)
        if BOOTED in seen:
            booted.set()
        if DONE in seen:
            done.set()

    cfg = MachineConfig(memory=128 << 20, cpus=cpus, firmware=SEABIOS,
                        disks=[DiskSpec(image=str(disk.path))], serial_sink=sink,
                        backend_args=backend_args)
    machine: Machine = start_machine(cfg)
    threading.Thread(target=_watch, args=(done, machine, timeout), daemon=True).start()
    outages: list[float] = []
    if kills:
        threading.Thread(target=_kill_backend, args=(machine, booted, done, kills, outages),
                         daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: machine.request_stop(signal.Signals(s).name))
    try:
        why = machine.run()
    finally:
        machine.shutdown()
    if why not in ("stop", "shutdown") and machine.failure:
        why = f"{why}: {machine.failure}"
    return _report(disk, seen.decode(errors="replace"), why, outages, kills)


def _watch(done: threading.Event, machine: Machine, timeout: float) -> None:
    if done.wait(timeout):
        machine.request_stop("demo finished")
    else:
        machine.events.put(("timeout", f"no result within {timeout:.0f} s"))


def _kill_backend(machine: Machine, booted: threading.Event, done: threading.Event,
                  kills: int, outages: list[float]) -> None:
    """Crash the disk's backend while the guest reads; note each outage."""
    if not booted.wait(60):
        return
    link = machine.links["blk0"]
    for n in range(1, kills + 1):
        if done.wait(KILL_INTERVAL):
            return  # the guest finished first
        try:
            machine.supervisor.signal_backend("blk0", "kill")
        except Exception as exc:  # the backend may be restarting: report, go on
            log.warning("demo: cannot kill the backend: %s", exc)
            continue
        print(f"\r\ndvmm demo: SIGKILL #{n} to the blk backend", file=sys.stderr)
        deadline = time.monotonic() + 30
        while link.restores < n and time.monotonic() < deadline and not done.is_set():
            time.sleep(0.005)
        restores = [e for e in machine.control.history()
                    if e["event"] == "device-restored"]
        if len(restores) >= n:
            outages.append(float(restores[n - 1]["outage_ms"]))


def _report(disk: DemoDisk, text: str, why: str, outages: list[float], kills: int) -> int:
    result = parse_demo_output(text)
    problems = disk.mismatches(result)
    print(file=sys.stderr)
    if problems or why != "stop":
        reason = "; ".join(problems) or why
        print(f"dvmm demo: FAILED: {reason}", file=sys.stderr)
        return 1
    print(f"dvmm demo: OK: the guest read {disk.sectors} sectors through SeaBIOS and the "
          f"dvmm blk backend; checksum {disk.checksum_hex} matches the host's",
          file=sys.stderr)
    if outages:
        shown = ", ".join(f"{ms:.0f}" for ms in outages)
        print(f"dvmm demo: the backend was killed {len(outages)} time(s) during the reads and "
              f"came back each time (outages {shown} ms); the guest lost nothing",
              file=sys.stderr)
    if len(outages) < kills:
        print(f"dvmm demo: (the reads ended before kill #{len(outages) + 1} of {kills})",
              file=sys.stderr)
    return 0
