"""The options every dvmm backend shares, in one place.

Each backend (``dvmm backend blk|net|display``) listens on a vhost-user
socket given by path or inherited fd, and ends its option list the same
way: the command endpoint, ``--print-capabilities`` (the vhost-user
backend program conventions of QEMU's ``docs/interop/vhost-user.rst``),
the warm-standby fd and the logging switches.  A backend's ``main.py``
adds its own options between :func:`add_listen_args` and
:func:`add_common_tail` and builds its parser with :func:`build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .cli import ArgumentParser, UsageError, add_logging_args, add_standby_arg
from .vhost_user.control_host import add_control_argument


def add_listen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                   help="Unix socket to listen on (created; a stale socket is replaced)")
    p.add_argument("--fd", type=int, metavar="N",
                   help="use the already-listening Unix socket inherited as fd N")


def add_common_tail(p: argparse.ArgumentParser) -> None:
    add_control_argument(p)
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user capabilities as JSON and exit")
    add_standby_arg(p)
    add_logging_args(p)


def build_parser(prog: str, description: str, epilog: str,
                 add_arguments: Callable[[argparse.ArgumentParser], None]
                 ) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def check_listen_args(args: argparse.Namespace) -> None:
    """Exactly one of ``--socket`` and ``--fd``."""
    if bool(args.socket) == (args.fd is not None):
        raise UsageError("give exactly one of --socket PATH or --fd N")


def drop_privileges(*on_error: Callable[[], object]) -> None:
    """``sandbox.drop_privileges`` before the backend's first thread; on failure
    run *on_error* (close what is open) and fail as a usage error."""
    from . import sandbox

    try:
        sandbox.drop_privileges()
    except sandbox.SandboxError as exc:
        for close in on_error:
            close()
        raise UsageError(str(exc)) from None


def confine(policy: str, enabled: bool, *on_error: Callable[[], object]) -> None:
    """Start-up is over: load the backend's seccomp allow-list (``--no-seccomp``:
    *enabled* false); on failure run *on_error* and fail as a usage error."""
    from . import sandbox

    try:
        sandbox.confine(policy, enabled)
    except sandbox.SandboxError as exc:
        for close in on_error:
            close()
        raise UsageError(str(exc)) from None
