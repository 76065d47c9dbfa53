"""``dvmm chaos fuzz TARGET|--list``: the options and what is printed.

Runs the targets one after another (``all``: every listed one), each in its
own child (:mod:`.runner`), prints one summary line per target and exits 1
when any crashed (its input and traceback are kept; the line says where).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType

from dvmm_shared.cli import UsageError

from . import TARGETS
from ._atheris import available

DESCRIPTION = """\
Fuzz a dvmm backend the way a hostile frontend or guest would: malformed
vhost-user message streams, descriptor chains and device requests in guest
memory, virtio-gpu commands, QMP input.  Coverage-guided (atheris +
libFuzzer); the real backend code runs in a child process, bounded by
-rss_limit_mb and a per-input timeout.  A refused input is fine; an
exception, a signal, a hang, the memory limit or a leaked fd is a crash:
the input is saved and the command exits 1.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="TARGET",
                   help="a target of --list, or 'all' (each in turn)")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--time", type=float, metavar="SECONDS",
                   help="fuzzing time per target (default 60; with --runs: no limit)")
    p.add_argument("--runs", type=int, metavar="N", help="stop after N inputs")
    p.add_argument("--corpus", metavar="DIR", help="corpus directory, read and extended "
                   "(default: a fresh one per target, removed afterwards); with 'all', "
                   "one subdirectory per target")
    p.add_argument("--seed", type=int, metavar="N", help="libFuzzer's random seed")
    p.add_argument("--artifacts", metavar="DIR", help="where crashing inputs and the "
                   "child's log go (default: a new directory under /tmp, kept on a crash)")
    p.add_argument("--rss-limit", type=int, default=2048, metavar="MB",
                   help="the child's RSS limit (default 2048)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for t in TARGETS.values():
            if not t.hidden:
                print(f"  {t.name:19} {t.help}")
        return 0
    names = _targets(args.target)
    if args.time is not None and not args.time > 0:
        raise UsageError(f"--time must be positive, not {args.time}")
    if args.runs is not None and args.runs < 1:
        raise UsageError(f"--runs must be at least 1, not {args.runs}")
    if (why := available()) is not None:
        raise UsageError(why)
    seconds = args.time if args.time is not None else (None if args.runs else 60.0)
    from . import runner

    # unwind on SIGTERM too, so the runner stops its child (by pid) on the way out
    signal.signal(signal.SIGTERM, _interrupted)

    results = []
    for name in names:
        corpus, drop_corpus = _dir(args.corpus, name, len(names) > 1, "corpus")
        artifacts, drop_artifacts = _dir(args.artifacts, name, len(names) > 1, "artifacts")
        r = runner.run(name, corpus, artifacts, seconds=seconds, runs=args.runs,
                       seed=args.seed, rss_limit_mb=args.rss_limit)
        results.append(r)
        print(r.summary(), flush=True)
        if not r.ok:
            print(f"  CRASH: inputs {', '.join(r.artifacts) or '(none saved)'}; "
                  f"output {r.log}", flush=True)
        if drop_corpus:
            shutil.rmtree(corpus, ignore_errors=True)
        if drop_artifacts and r.ok:
            shutil.rmtree(artifacts, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _targets(name: str | None) -> list[str]:
    if name is None:
        raise UsageError("name a TARGET (see --list) or 'all'")
    if name == "all":
        return [t.name for t in TARGETS.values() if not t.hidden]
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}; see dvmm chaos fuzz --list")
    return [name]


def _dir(given: str | None, name: str, several: bool, what: str) -> tuple[Path, bool]:
    """The directory to use, and whether it is ours to remove afterwards."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix=f"dvmm-fuzz-{name}-{what}-")), True
    path = Path(given) / name if several else Path(given)
    return path, False
