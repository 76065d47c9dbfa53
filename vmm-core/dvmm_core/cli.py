"""The ``dvmm`` command: one entry point, one subcommand per program.

Owns only the dispatch.  Each program keeps its own options and behaviour in
its package (``dvmm backend blk`` is :mod:`dvmm_blk.main`, ``dvmm guest`` is
:mod:`dvmm_core.guest.build`, ``dvmm bench`` is :mod:`dvmm_bench.cli`).

Subcommands are registered by name (:data:`COMMANDS`): only the module of
the program being run is imported and only its parser is built; every other
command is a bare entry with its one-line help, which is all ``dvmm --help``
shows.  So ``dvmm run`` never imports the benchmarks, the guest builder, the
control clients or the backends (start-up to the first guest instruction is
a benchmark: ``dvmm bench core``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from dvmm_shared.cli import run_main

DESCRIPTION = """\
dvmm: a multiprocess, disaggregated KVM virtual machine monitor.  Every
device model runs in its own vhost-user backend process that maps guest
memory and serves its virtqueues itself.
"""


class Command(NamedTuple):
    """A subcommand: ``register(sub)`` in ``module`` adds its full parser
    (and may add sibling commands, as :mod:`.control_cli` does)."""

    name: str
    help: str
    module: str
    register: str = "add_parser"

    def add_full(self, sub: Any) -> None:
        getattr(importlib.import_module(self.module), self.register)(sub)


COMMANDS = (
    Command("backend", "run a device backend process", "dvmm_core.cli", "add_backend_parser"),
    Command("guest", "the Linux test guest (kernel + initramfs)", "dvmm_core.guest.build"),
    Command("run", "run a virtual machine", "dvmm_core.run"),
    Command("demo", "run the built-in default VM", "dvmm_core.demo_vm"),
    Command("demo-disk", "write the demo boot disk (int 13h reads + checksum on COM1)",
            "dvmm_core.boot.demo"),
    Command("events", "print a VM's event stream", "dvmm_core.control_cli", "add_parsers"),
    Command("status", "show a VM's backends: state, restarts, RSS, CPU, I/O",
            "dvmm_core.control_cli", "add_parsers"),
    Command("fault", "inject a fault into one backend", "dvmm_core.control_cli",
            "add_parsers"),
    Command("display", "a running VM's display (screenshot)", "dvmm_core.display_cli"),
    Command("config", "VM configuration files (dump the effective one as TOML)",
            "dvmm_core.config_dump"),
    Command("top", "a live view of a VM and its backends (state, RSS, CPU, I/O)",
            "dvmm_core.top"),
    Command("img", "create, inspect, check and convert disk images", "dvmm_blk.img_cli"),
    Command("bench", "benchmarks against peers (ratios, not tests)", "dvmm_bench.cli"),
    Command("chaos", "fault-injection campaigns with integrity oracles (run, replay, list)",
            "dvmm_core.chaos.cli"),
    Command("docker", "build the backends' container images",
            "dvmm_core.runners_docker_build"),
)


def add_backend_parser(sub: Any) -> None:
    """``dvmm backend blk|net|display``: the backends' own parsers, under one command."""
    from dvmm_blk import main as blk_main
    from dvmm_display import main as display_main
    from dvmm_net import main as net_main

    backend = sub.add_parser("backend", help="run a device backend process",
                             description="Run one device backend (a vhost-user server).")
    kinds = backend.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, program, text in (
            ("blk", blk_main, "virtio-blk backend over a disk image"),
            ("net", net_main, "virtio-net backend on a TAP or a VM-to-VM link"),
            ("display", display_main, "display process: VNC server, virtio-gpu")):
        p = kinds.add_parser(kind, help=text, description=program.DESCRIPTION,
                             epilog=program.EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        program.add_arguments(p)
        p.set_defaults(func=program.run)


def chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first non-option word)."""
    for word in argv:
        if not word.startswith("-"):
            return word
        if word == "--":
            return None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``dvmm`` parser with the full parser of the command in ``argv`` only
    (``argv=None``: of every command, for tools and tests)."""
    parser = argparse.ArgumentParser(prog="dvmm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    name = None if argv is None else chosen(argv)
    want = {(c.module, c.register) for c in COMMANDS if argv is None or c.name == name}
    for cmd in COMMANDS:
        key = (cmd.module, cmd.register)
        if key not in want:
            sub.add_parser(cmd.name, help=cmd.help, add_help=False)
        elif cmd.name not in sub.choices:  # a module may register its siblings too
            cmd.add_full(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    wrap = getattr(args, "wrap", None)
    if wrap is not None:
        func = wrap(func)
    return run_main("dvmm", lambda: int(func(args)))


if __name__ == "__main__":
    sys.exit(main())
