"""The ``dvmm`` command: one entry point, one subcommand per program.

Owns only the dispatch.  Each program keeps its own options and behaviour in
its package (``dvmm backend blk`` is :mod:`dvmm_blk.main`, ``dvmm guest`` is
:mod:`dvmm_core.guest.build`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dvmm_shared.cli import UsageError, run_main

DESCRIPTION = """\
dvmm: a multiprocess, disaggregated KVM virtual machine monitor.  Every
device model runs in its own vhost-user backend process that maps guest
memory and serves its virtqueues itself.
"""


def build_parser() -> argparse.ArgumentParser:
    from dvmm_blk import main as blk_main
    from dvmm_net import main as net_main

    from . import control_cli, demo_vm, run
    from .bench import blk as bench_blk
    from .bench import core as bench_core
    from .bench import net as bench_net
    from .bench import recovery as bench_recovery
    from .bench import report as bench_report
    from .bench import startup
    from .boot import demo as demo_disk
    from .guest import build as guest_build

    parser = argparse.ArgumentParser(prog="dvmm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backend = sub.add_parser("backend", help="run a device backend process",
                             description="Run one device backend (a vhost-user server).")
    kinds = backend.add_subparsers(dest="kind", metavar="KIND", required=True)
    blk = kinds.add_parser("blk", help="virtio-blk backend over a disk image",
                           description=blk_main.DESCRIPTION, epilog=blk_main.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    blk_main.add_arguments(blk)
    blk.set_defaults(func=blk_main.run)
    net = kinds.add_parser("net", help="virtio-net backend on a TAP or a VM-to-VM link",
                           description=net_main.DESCRIPTION, epilog=net_main.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    net_main.add_arguments(net)
    net.set_defaults(func=net_main.run)

    guest_build.add_parser(sub)
    run.add_parser(sub)
    demo_vm.add_parser(sub)
    demo_disk.add_parser(sub)
    control_cli.add_parsers(sub)

    bench = sub.add_parser("bench", help="benchmarks against peers (ratios, not tests)",
                           description="Benchmarks that run dvmm and a peer in the same "
                           "invocation and print the ratio.")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    startup.add_parser(benches)
    bench_blk.add_parser(benches)
    bench_core.add_parser(benches)
    bench_net.add_parser(benches)
    bench_recovery.add_parser(benches)
    bench_report.add_parser(benches)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("dvmm", lambda: int(_bench_errors(args.func)(args)
                                        if args.command == "bench" else args.func(args)))


def _bench_errors(func: Callable[[argparse.Namespace], int]
                  ) -> Callable[[argparse.Namespace], int]:
    """A benchmark that cannot run (a peer missing, a backend not starting)
    reports that, with the peer's log, instead of a traceback."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (RuntimeError, OSError) as exc:
            raise UsageError(f"bench {args.bench}: {exc}") from None
    return wrapped


if __name__ == "__main__":
    sys.exit(main())
