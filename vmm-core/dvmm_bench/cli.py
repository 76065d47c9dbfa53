"""``dvmm bench``: the benchmark subcommands, registered on the ``dvmm`` command.

Owns the ``bench`` parser and how a benchmark that cannot run fails (one
line with the peer's complaint, no traceback).  The benchmarks live in this
package, beside the core and outside it: the core process never imports
them (``../shared/DESIGN.md``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dvmm_shared.cli import UsageError

from .report import plot_problem


def add_parser(sub: Any) -> None:
    from . import blk, core, display, net, recovery, report, startup

    bench = sub.add_parser("bench", help="benchmarks against peers (ratios, not tests)",
                           description="Benchmarks that run dvmm and a peer in the same "
                           "invocation and print the ratio.")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for module in (startup, blk, core, net, recovery, display, report):
        module.add_parser(benches)
    bench.set_defaults(wrap=bench_errors)


def bench_errors(func: Callable[[argparse.Namespace], int]
                 ) -> Callable[[argparse.Namespace], int]:
    """A benchmark that cannot run (a peer missing, a backend not starting)
    reports that, with the peer's log, instead of a traceback."""
    def wrapped(args: argparse.Namespace) -> int:
        plot = getattr(args, "plot", None)
        if plot is not None and (why := plot_problem(plot)) is not None:
            raise UsageError(f"bench {args.bench}: {why}")  # at once, not after the runs
        try:
            return func(args)
        except (RuntimeError, OSError) as exc:
            raise UsageError(f"bench {args.bench}: {exc}") from None
    return wrapped
