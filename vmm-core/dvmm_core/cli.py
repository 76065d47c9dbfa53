"""The ``dvmm`` command: one entry point, one subcommand per program.

Owns only the dispatch.  Each program keeps its own options and behaviour in
its package (``dvmm backend blk`` is :mod:`dvmm_blk.main`, ``dvmm guest`` is
:mod:`dvmm_core.guest.build`, ``dvmm bench`` is :mod:`dvmm_bench.cli`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dvmm_shared.cli import run_main

DESCRIPTION = """\
dvmm: a multiprocess, disaggregated KVM virtual machine monitor.  Every
device model runs in its own vhost-user backend process that maps guest
memory and serves its virtqueues itself.
"""


def build_parser() -> argparse.ArgumentParser:
    from dvmm_bench import cli as bench_cli
    from dvmm_blk import main as blk_main
    from dvmm_display import main as display_main
    from dvmm_net import main as net_main

    from . import control_cli, demo_vm, run
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
    display = kinds.add_parser("display", help="display process: VNC server, virtio-gpu",
                               description=display_main.DESCRIPTION,
                               epilog=display_main.EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    display_main.add_arguments(display)
    display.set_defaults(func=display_main.run)

    guest_build.add_parser(sub)
    run.add_parser(sub)
    demo_vm.add_parser(sub)
    demo_disk.add_parser(sub)
    control_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    wrap = getattr(args, "wrap", None)
    if wrap is not None:
        func = wrap(func)
    return run_main("dvmm", lambda: int(func(args)))


if __name__ == "__main__":
    sys.exit(main())
