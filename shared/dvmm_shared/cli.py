"""Process conventions every dvmm program follows.

Owns logging set-up (one line per record, to stderr) and the way a program
fails: a :class:`UsageError` (bad arguments, missing resources) becomes one
line on stderr and exit status 2 or 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class UsageError(Exception):
    """A problem the user can fix: printed as one line, exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def setup_logging(name: str, verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"{name}[%(process)d] %(levelname).1s %(name)s: %(message)s",
    )


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log every vhost-user message and request")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def add_standby_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--standby-fd", type=int, metavar="N",
        help="start as a warm standby (dvmm's supervisor does this to restart a crashed "
             "backend in milliseconds): load the program, then wait for one byte on fd N "
             "before opening anything or listening; exit quietly when N is closed instead")


def wait_for_activation(fd: int | None) -> None:
    """``--standby-fd``: block until the supervisor activates this process.

    Called before the program opens its image, TAP or sockets, so a standby
    holds nothing its running twin needs; everything imported is ready."""
    if fd is None:
        return
    try:
        go = os.read(fd, 1)
    except OSError as exc:
        raise UsageError(f"--standby-fd {fd}: {one_line(exc)}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    if not go:
        raise SystemExit(0)  # the supervisor does not need this standby any more


def run_main(prog: str, func: Callable[[], int]) -> int:
    """Run ``func``; turn user errors into one line and a non-zero exit."""
    try:
        return func()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def one_line(exc: BaseException) -> str:
    """An OSError or other exception as a short human sentence."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def parse_size(text: str, units: Sequence[str] = ("K", "M", "G", "T")) -> int:
    """``4096``, ``64M``, ``1G`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in units:
        mult = 1024 ** (units.index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return value
