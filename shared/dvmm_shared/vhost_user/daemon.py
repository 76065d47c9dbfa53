"""The vhost-user backend daemon: a listening socket and one event loop.

Owns the listening socket, the loop and the current frontend connection.
The loop waits on the listener, the frontend socket, every started ring's
kick eventfd, the extra fds a backend watches (net RX from a TAP), and a
wake pipe (stop, :meth:`Daemon.call_soon`).  The protocol state and the
ring service of a connection are the :class:`Session`'s (:mod:`.session`).

One loop serves the socket and all queues: a frontend message and queue
processing never run at the same time, so no ring state needs a lock.  A
frontend disconnect resets everything and the daemon waits for the next
frontend.  A frontend that stalls inside a message (half a header, a
header whose payload never comes) is dropped after ``message_timeout``
seconds, so it cannot wedge the backend; replies are bounded by the same
deadline.

Hooks for supervisors and fault injection, all run on the loop thread:
:meth:`Daemon.call_soon` (from any thread), :meth:`Daemon.drop_frontend`,
:attr:`Daemon.service_delay` and :attr:`Daemon.crash_point`; kicks and calls
go through ``faults.channel`` (:mod:`.channel`: dropped or delayed on
command, and the safety net that recovers a lost kick or call).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import stat
from collections import deque
from collections.abc import Callable
from types import FrameType

from .backend import BackendStats, VhostUserBackend
from .connection import Connection, ConnectionClosed
from .message import MessageError
from .session import DAEMON_PROTOCOL_FEATURES, MAX_MEM_SLOTS, Session
from .vring import CRASH_POINTS, Faults, RequestFailed, RingState, Vring

__all__ = [
    "CRASH_POINTS", "DAEMON_PROTOCOL_FEATURES", "DEFAULT_MESSAGE_TIMEOUT", "MAX_MEM_SLOTS",
    "Daemon", "RequestFailed", "RingState", "Session", "Vring", "bind_unix_socket",
]

log = logging.getLogger("dvmm.vhost_user")

#: Seconds a frontend has to deliver the rest of a message it started, and
#: to take a reply.
DEFAULT_MESSAGE_TIMEOUT = 5.0


class Daemon:
    """Listen on a Unix socket and serve one frontend at a time, until SIGTERM."""

    def __init__(self, backend: VhostUserBackend, socket_path: str, *,
                 message_timeout: float = DEFAULT_MESSAGE_TIMEOUT) -> None:
        self._setup(backend, bind_unix_socket(socket_path), socket_path, message_timeout)

    @classmethod
    def listening(cls, backend: VhostUserBackend, socket_path: str | None,
                  fd: int | None, *, message_timeout: float = DEFAULT_MESSAGE_TIMEOUT
                  ) -> Daemon:
        """The backend program conventions: a socket path to create, or an
        inherited, already-listening socket (``--fd``)."""
        if fd is not None:
            return cls.from_listener(backend, socket.socket(fileno=fd),
                                     message_timeout=message_timeout)
        if socket_path is None:
            raise ValueError("a socket path or a listening fd is needed")
        return cls(backend, socket_path, message_timeout=message_timeout)

    @classmethod
    def from_listener(cls, backend: VhostUserBackend, listener: socket.socket, *,
                      message_timeout: float = DEFAULT_MESSAGE_TIMEOUT) -> Daemon:
        """Serve on an inherited listening socket (``--fd``); nothing to unlink."""
        self = cls.__new__(cls)
        self._setup(backend, listener, None, message_timeout)
        return self

    def _setup(self, backend: VhostUserBackend, listener: socket.socket,
               path: str | None, message_timeout: float) -> None:
        if not message_timeout > 0:
            raise ValueError(f"message timeout {message_timeout} is not positive")
        self.backend = backend
        self.path = path
        self.listener = listener
        self.message_timeout = message_timeout
        self.stats = BackendStats()
        self.faults = Faults()
        #: The current frontend connection, if any (loop thread only).
        self.session: Session | None = None
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._soon: deque[Callable[[], None]] = deque()
        self._running = True

    # -- fault injection and control hooks ----------------------------------------
    @property
    def crash_point(self) -> str | None:
        """Where the serve loop SIGKILLs this process while handling a request
        (one of :data:`CRASH_POINTS`), or None."""
        return self.faults.crash_point

    @crash_point.setter
    def crash_point(self, point: str | None) -> None:
        if point is not None and point not in CRASH_POINTS:
            raise ValueError(f"crash point {point!r} is not one of {', '.join(CRASH_POINTS)}")
        self.faults.crash_point = point

    @property
    def service_delay(self) -> float:
        """Seconds slept before each ring service pass (fault injection)."""
        return self.faults.service_delay

    @service_delay.setter
    def service_delay(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"service delay {seconds} is negative")
        self.faults.service_delay = seconds

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon (safe from any thread)."""
        self._soon.append(fn)
        self._wake()

    def drop_frontend(self) -> bool:
        """End the current session as if the frontend had disconnected (loop
        thread only); whether there was one."""
        if self.session is None:
            return False
        log.warning("dropping the frontend on request")
        self._end_session()
        return True

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._running = False
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- the loop -----------------------------------------------------------------
    def serve_forever(self) -> None:
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", 0))
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        log.info("listening on %s", self.path or f"fd {self.listener.fileno()}")
        try:
            while self._running:
                # (a timeout only while timers or the lost-notification safety
                # net of .channel need the loop; idle, it blocks)
                for key, mask in self.sel.select(self.faults.channel.timeout(self.session)):
                    self._dispatch(key, mask)
                self.faults.channel.run_due(self.session)
        finally:
            if self.session is not None:
                self._end_session()
            self.close()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        kind, index = key.data
        session = self.session
        if kind == "accept":
            self._accept()
        elif kind == "msg" and session is not None and key.fileobj is session.conn.sock:
            # (an event of a session dropped earlier in this batch must not
            # read from its replacement's socket)
            self._on_message(session)
        elif kind == "kick" and session is not None:
            self.faults.channel.on_kick(session, index)
        elif kind == "extra" and session is not None:
            session.on_ready(index, mask)
        elif kind == "wake":
            self._on_wake()

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._soon:
            fn = self._soon.popleft()
            try:
                fn()
            except Exception:
                log.exception("a call_soon callback failed")

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.set_inheritable(False)
        if self.session is not None:
            log.warning("a new frontend connected; dropping the previous one")
            self._end_session()
        self.stats.connections += 1
        log.info("frontend connected")
        sock.settimeout(self.message_timeout)  # bounds replies; recv has its own deadline
        conn = Connection(sock)
        self.sel.register(conn.sock, selectors.EVENT_READ, ("msg", 0))
        self.session = Session(self.backend, conn, self.sel, self.stats, self.faults)

    def _on_message(self, session: Session) -> None:
        try:
            msg = session.conn.recv(timeout=self.message_timeout)
        except ConnectionClosed as exc:
            log.info("frontend disconnected (%s); waiting for the next one", exc)
            self._end_session()
            return
        except TimeoutError:
            self.stats.protocol_errors += 1
            log.warning("dropping the frontend: no whole message within %g s",
                        self.message_timeout)
            self._end_session()
            return
        except (MessageError, OSError) as exc:
            self.stats.protocol_errors += 1
            log.warning("dropping the frontend: %s", exc)
            self._end_session()
            return
        try:
            session.handle_message(msg)
        except OSError as exc:  # the reply could not be sent
            log.warning("dropping the frontend: %s", exc)
            self._end_session()

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        session.reset()
        self.sel.unregister(session.conn.sock)
        session.conn.close()

    def close(self) -> None:
        self.sel.close()
        self.listener.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.backend.close()


def bind_unix_socket(path: str) -> socket.socket:
    """Listen on ``path``; a stale socket file is replaced, any other file is not."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        else:
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass
    # Bind and listen under a temporary name, then rename into place: a
    # frontend that sees the socket file can connect at once (no window in
    # which it exists but refuses connections).
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        sock.listen(1)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return sock
