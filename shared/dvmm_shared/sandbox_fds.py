"""Handing a backend its resources as file descriptors (issue 12).

Owns the small protocol by which the core's supervisor gives a backend the
fds it would otherwise need privileges or a view of the host to open (the
disk image, the TAP queues) when they cannot simply be inherited: a Docker
container's process is not a child of the core, so its fds travel over a
Unix socket with ``SCM_RIGHTS`` (unix(7)).

* Supervisor side, :class:`FdOffer`: listens on ``PATH`` (in the backend's
  own socket directory) and answers every connection with one message: a
  JSON map ``{option: count}`` (``{"image-fd": 1}``, ``{"tap-fd": 2}``) and
  the fds in that order.  The connection then stays open as a *lifeline*.
* Backend side, :func:`apply_handed_fds`: ``--fds-from PATH`` connects,
  receives, and sets each option as if it had been given on the command
  line (``--image-fd 5``, ``--tap-fd 6,7``).  When the lifeline closes (the
  core died or stopped) the backend stops itself with SIGTERM: a container
  has no ``PR_SET_PDEATHSIG`` link to the core, and must not outlive it.

Hostile input both ways: the header is bounded and checked (known option
names, counts that match the fds that arrived); fds nobody asked for are
closed.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping, Sequence

log = logging.getLogger("dvmm.sandbox")

MAX_HEADER = 4096
MAX_FDS = 64
#: Options a supervisor may set this way (what the backends accept as fds).
FD_OPTIONS = ("image-fd", "tap-fd")
RECEIVE_TIMEOUT = 10.0


class FdPassingError(Exception):
    """The fd hand-off failed or the peer sent something malformed."""


class FdOffer:
    """Serve ``fds`` (option -> fds) to whoever connects to ``path``."""

    def __init__(self, path: str, fds: Mapping[str, Sequence[int]]) -> None:
        for name in fds:
            if name not in FD_OPTIONS:
                raise ValueError(f"cannot hand over {name!r} (known: {', '.join(FD_OPTIONS)})")
        self.path = path
        self.names = {name: len(v) for name, v in fds.items()}
        self.fds = [fd for v in fds.values() for fd in v]
        self._lifelines: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._listener.bind(path)
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, name=f"fds {path}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        header = json.dumps(self.names).encode()
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                conn.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", self.fds))])
            except OSError as exc:
                log.warning("handing fds over %s failed: %s", self.path, exc)
                conn.close()
                continue
            with self._lock:
                # Keep only live lifelines: a restarted backend's old one is closed.
                self._lifelines = [s for s in self._lifelines if _alive(s)]
                self._lifelines.append(conn)

    def close(self) -> None:
        """Stop serving and cut every lifeline (the backends stop)."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._lifelines:
                conn.close()
            self._lifelines.clear()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _alive(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def receive_fds(path: str, timeout: float = RECEIVE_TIMEOUT
                ) -> tuple[dict[str, list[int]], socket.socket]:
    """Connect to an :class:`FdOffer`; the fds by option, and the lifeline."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        msg, anc, flags, _ = sock.recvmsg(MAX_HEADER, socket.CMSG_SPACE(4 * MAX_FDS))
    except OSError as exc:
        sock.close()
        raise FdPassingError(f"cannot receive fds from {path}: {exc}") from None
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    try:
        names = _check_header(msg, flags, len(fds))
    except FdPassingError:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise
    out, at = {}, 0
    for name, count in names.items():
        out[name] = list(fds[at:at + count])
        at += count
    for fd in fds:
        os.set_inheritable(fd, False)
    return out, sock


def _check_header(msg: bytes, flags: int, nfds: int) -> dict[str, int]:
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        raise FdPassingError("fd hand-off message truncated")
    try:
        names = json.loads(msg)
    except ValueError:
        raise FdPassingError("fd hand-off header is not JSON") from None
    if not isinstance(names, dict) or not all(
            k in FD_OPTIONS and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in names.items()):
        raise FdPassingError(f"bad fd hand-off header {msg[:80]!r}")
    if sum(names.values()) != nfds:
        raise FdPassingError(f"fd hand-off announced {sum(names.values())} fds, got {nfds}")
    return names


def add_fds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fds-from", metavar="PATH",
                   help="receive the resources (image or TAP fds) from the supervisor over "
                        "this Unix socket, and stop when it closes (containers)")


def apply_handed_fds(args: argparse.Namespace) -> socket.socket | None:
    """``--fds-from``: receive, set the options, watch the lifeline."""
    if getattr(args, "fds_from", None) is None:
        return None
    from .cli import UsageError

    try:
        fds, lifeline = receive_fds(args.fds_from)
    except FdPassingError as exc:
        raise UsageError(str(exc)) from None
    for name, values in fds.items():
        dest = name.replace("-", "_")
        if not hasattr(args, dest):
            raise UsageError(f"--fds-from {args.fds_from}: this backend takes no --{name}")
        setattr(args, dest, ",".join(map(str, values)) if name == "tap-fd" else values[0])
    return lifeline


def watch_lifeline(lifeline: socket.socket) -> None:
    """SIGTERM this process when the supervisor's end closes (call after
    :func:`dvmm_shared.sandbox.drop_privileges`: it starts a thread)."""
    def wait() -> None:
        lifeline.settimeout(None)
        try:
            while lifeline.recv(64):
                pass
        except OSError:
            pass
        log.warning("the supervisor's lifeline closed; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="lifeline", daemon=True).start()
