"""A VM-to-VM link: two net backends joined by a Unix socket, no TAP, no root.

Owns the rendezvous and the socket.  ``--peer PATH`` on both backends:
whoever finds nobody listening at PATH listens there, the other one
connects.  The socket is ``SOCK_SEQPACKET``, so each message is exactly one
Ethernet frame (record boundaries kept, no length prefix, no partial reads)
and the kernel provides flow control: a full peer makes ``send`` raise
BlockingIOError and the device waits for the fd to be writable.

The link is plugged in only while the device drains it (its receive ring
runs): when the guest stops or its frontend goes away the connection is
closed and the socket removed, so the other side sees the cable pulled and
drops its frames instead of stalling on a peer that will not read.

Frames travel without the virtio-net header (``vnet_hdr`` is False): each
side strips it on transmit and writes a plain one on receive, so neither
guest is offered checksum or segmentation offloads.

States: ``DOWN`` (unplugged: at start, only the path is checked),
``LISTENING`` (plugged, waiting for the other backend; frames sent meanwhile
are dropped) and ``CONNECTED``.  When the
other side goes away, the listening side waits on its listener for the
next connection; the connecting side runs the rendezvous again.  The
rendezvous is serialised by ``flock`` on ``PATH.lock`` (two backends
starting together cannot both listen), and the listener is bound under a
temporary name and renamed onto PATH, so PATH never names a socket that
exists but does not listen yet.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import select
import socket
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from dvmm_shared.cli import one_line

from .link import LinkChanged, LinkDown, LinkError

log = logging.getLogger("dvmm.net")

CONNECT_TIMEOUT = 5.0


class PeerState(enum.Enum):
    DOWN = "down"
    LISTENING = "listening"
    CONNECTED = "connected"


class PeerLink:
    """One SOCK_SEQPACKET connection to another backend (one queue pair)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._listener: socket.socket | None = None
        self._listener_id: tuple[int, int] | None = None
        self._conn: socket.socket | None = None
        self.state = PeerState.DOWN
        self.connections = 0
        try:  # a bad path is a start-up error; the link is plugged in later
            with self._locked():
                _check_not_other_file(path)
        except OSError as exc:
            raise LinkError(f"cannot use peer socket {path}: {one_line(exc)}") from None

    # -- rendezvous ---------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _rendezvous(self) -> None:
        """Connect to whoever listens at the path, else listen there."""
        with self._locked():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.settimeout(CONNECT_TIMEOUT)  # a listener with a full backlog
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                self._listen()
                return
            except OSError:
                sock.close()
                raise
        self._connected(sock, "connected to")

    def _listen(self) -> None:
        _check_not_other_file(self.path)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            sock.listen(1)
            os.rename(tmp, self.path)  # atomically replaces a stale socket file
            st = os.stat(self.path)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener, self._listener_id = sock, (st.st_dev, st.st_ino)
        self.state = PeerState.LISTENING
        log.info("peer link: listening on %s", self.path)

    def _connected(self, sock: socket.socket, how: str) -> None:
        sock.setblocking(False)
        self._conn = sock
        self.state = PeerState.CONNECTED
        self.connections += 1
        log.info("peer link: %s %s", how, self.path)

    # -- Link ---------------------------------------------------------------------
    @property
    def vnet_hdr(self) -> bool:
        return False

    @property
    def pairs(self) -> int:
        return 1

    @property
    def description(self) -> str:
        return f"peer link {self.path}"

    def fileno(self, pair: int) -> int:
        """The connection, else the listener (readable: a peer is connecting);
        -1 when unplugged."""
        sock = self._conn if self._conn is not None else self._listener
        return sock.fileno() if sock is not None else -1

    def recv(self, pair: int, bufs: Sequence[memoryview]) -> int:
        if self._conn is None:
            if self._incoming():
                raise LinkChanged("a peer is connecting")
            raise BlockingIOError(errno.EAGAIN, "no peer yet")
        try:
            # MSG_TRUNC: the return value is the whole record's length.
            n, _, _, _ = self._conn.recvmsg_into(bufs, 0, socket.MSG_TRUNC)
        except (ConnectionResetError, BrokenPipeError):
            n = 0
        if n == 0:  # SOCK_SEQPACKET end of file: frames are never empty
            raise LinkChanged("the peer went away")
        return int(n)

    def _incoming(self) -> bool:
        if self._listener is None:
            return False
        ready, _, _ = select.select([self._listener], [], [], 0)
        return bool(ready)

    def send(self, pair: int, bufs: Sequence[memoryview]) -> None:
        if self._conn is None:
            raise LinkDown("no peer connected")
        try:
            self._conn.sendmsg(bufs)
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as exc:
            raise LinkDown(f"peer gone: {one_line(exc)}") from None

    def reopen(self, pair: int) -> None:
        if self._conn is not None:  # the peer went away
            self._conn.close()
            self._conn = None
            log.info("peer link: the peer on %s went away", self.path)
            if self._listener is None:
                self.state = PeerState.DOWN
                self._plug()
                return
            self.state = PeerState.LISTENING
        if self._listener is not None:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.set_inheritable(False)
            self._connected(sock, "accepted a peer on")

    def set_vnet_header(self, size: int, offloads: int) -> None:
        """Frames travel bare: nothing to set."""

    def set_pair_active(self, pair: int, active: bool) -> None:
        """Plug in while the receive ring runs, unplug otherwise."""
        if active and self.state is PeerState.DOWN:
            self._plug()
        elif not active and self.state is not PeerState.DOWN:
            log.info("peer link: unplugged from %s (nothing receives)", self.path)
            self._drop_sockets()

    def _plug(self) -> None:
        try:
            self._rendezvous()
        except OSError as exc:
            log.error("peer link: cannot use %s: %s", self.path, one_line(exc))

    def _drop_sockets(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                with self._locked():
                    self._unlink_own_socket()
            except OSError:  # no lock file (its directory is gone): nothing to race
                self._unlink_own_socket()
        self.state = PeerState.DOWN

    def close(self) -> None:
        self._drop_sockets()

    def _unlink_own_socket(self) -> None:
        """Remove PATH if it is still the socket we bound (not a successor's)."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._listener_id:
                os.unlink(self.path)
        except OSError:
            pass


def _check_not_other_file(path: str) -> None:
    """PATH may be absent or a (stale) socket; never replace anything else."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass
