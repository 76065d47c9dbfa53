"""Where a QMP server listens: ``--qmp`` values parsed and bound.

Owns the syntax QEMU's ``-qmp`` takes for a listening socket --
``unix:PATH[,server=on][,wait=off]`` and ``tcp:HOST:PORT[,server=on][,wait=off]``
-- and binding it: a stale Unix socket left by a dead VM is replaced (as
QEMU does), anything else at the path is an error.  dvmm only listens
(``server=off``, where QEMU would connect out, is refused) and never waits
for a client before starting the guest (``wait=on`` is refused).
"""

from __future__ import annotations

import os
import socket
import stat
from typing import NamedTuple

from dvmm_shared.cli import UsageError, one_line


class QmpAddress(NamedTuple):
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_address(text: str, flag: str = "--qmp") -> QmpAddress:
    """``unix:PATH[,opts]`` or ``tcp:HOST:PORT[,opts]``; UsageError naming the problem."""
    where, *opts = text.split(",")
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "server" and value in ("on", ""):
            continue
        if key == "wait" and value == "off":
            continue
        if (key, value) in (("server", "off"), ("wait", "on"), ("wait", "")):
            raise UsageError(f"{flag} {text}: {opt} is not supported (dvmm only listens, "
                             "and never waits for a client)")
        raise UsageError(f"{flag} {text}: unknown option {opt!r} (known: server=on, wait=off)")
    kind, sep, rest = where.partition(":")
    if kind == "unix" and sep and rest:
        return QmpAddress("unix", path=os.path.abspath(rest))
    if kind == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if colon and host and port.isdigit() and 0 <= int(port) <= 65535:
            return QmpAddress("tcp", host=host.strip("[]"), port=int(port))
        raise UsageError(f"{flag} {text}: tcp: needs HOST:PORT (e.g. tcp:127.0.0.1:4444)")
    raise UsageError(f"{flag} {text}: use unix:PATH or tcp:HOST:PORT")


def bind(address: QmpAddress) -> socket.socket:
    """A listening, non-blocking socket; UsageError (one line) if it cannot be had."""
    try:
        if address.kind == "unix":
            return _bind_unix(address.path)
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
    except (OSError, IndexError) as exc:
        raise UsageError(f"--qmp {address}: {one_line(exc)}") from None
    sock.setblocking(False)
    return sock


def _bind_unix(path: str) -> socket.socket:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"--qmp unix:{path}: exists and is not a socket")
        os.unlink(path)  # a stale socket of a VM that did not clean up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def unlink(address: QmpAddress) -> None:
    if address.kind == "unix":
        try:
            os.unlink(address.path)
        except OSError:
            pass
