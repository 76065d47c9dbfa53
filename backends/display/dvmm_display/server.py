"""The VNC server: a TCP listener and its clients on one selector loop thread.

Owns sockets and time: accepting clients, moving bytes between each socket
and its :class:`VncSession`, deciding when frames are taken from the
:class:`FrameSource` and offered to clients, and dropping clients that
misbehave.  The protocol itself is :mod:`.session`'s.

Flow control is the RFB one (RFC 6143 7.5.3): a client gets an update only
after asking for one, and a new update is only encoded once the previous
one has left the socket, so a slow client gets fewer frames, never a
growing queue.  One snapshot of the source serves every client of a pass.

A client is dropped, with one log line, and nobody else notices, when it
sends garbage (:class:`RfbError`), fails authentication, does not finish
the handshake, leaves a message half sent, or stops reading its updates for
``client_timeout`` seconds.  Input a client sends goes to an
:class:`InputSink` that never blocks (:mod:`.input`).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from .framebuffer import FrameSource
from .rfb import RfbError
from .session import ClientState, InputSink, Resizer, VncSession, no_resize

log = logging.getLogger("dvmm.vnc")

DEFAULT_CLIENT_TIMEOUT = 10.0
FRAME_INTERVAL = 0.04  # how often a waiting client's screen is compared (25 per second)
MAX_CLIENTS = 16
RECV_SIZE = 65536
SEND_SIZE = 1 << 20


@dataclass
class Client:
    sock: socket.socket
    peer: str
    session: VncSession
    since: float
    last_read: float
    last_write: float


@dataclass
class ServerStats:
    accepted: int = 0
    dropped: int = 0
    refused: int = 0
    auth_failures: int = 0
    updates: int = 0
    bytes_sent: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class VncServer:
    """Serves one frame source to any number of VNC clients (up to ``max_clients``)."""

    def __init__(self, host: str, port: int, source: FrameSource, sink: InputSink, *,
                 password: bytes | None = None, name: str = "dvmm",
                 client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
                 frame_interval: float = FRAME_INTERVAL,
                 max_clients: int = MAX_CLIENTS, resizer: Resizer = no_resize) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=16)
        self.listener.setblocking(False)
        self.source = source
        self.sink = sink
        self.password = password
        self.name = name
        self.client_timeout = client_timeout
        self.frame_interval = frame_interval
        self.max_clients = max_clients
        self.resizer = resizer  # a client's SetDesktopSize (ExtendedDesktopSize)
        self.stats = ServerStats()
        self.clients: dict[int, Client] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._running = True
        self._due = True
        self._next_pass = 0.0
        self._thread = threading.Thread(target=self._serve, name="vnc", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Offer a fresh frame soon (the picture's geometry changed); any thread."""
        self._due = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stop(self) -> None:
        """Close every client and the listener; waits for the loop thread."""
        self._running = False
        self.wake()
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._close()

    # -- the loop ----------------------------------------------------------------------
    def _serve(self) -> None:
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while self._running:
                for key, mask in self._sel.select(self._timeout()):
                    self._dispatch(key, mask)
                self._housekeeping()
        except Exception:
            log.exception("the VNC loop failed")
            raise
        finally:
            self._close()

    def _timeout(self) -> float:
        if self._due:
            return 0.0
        waiting = any(c.session.wants_update for c in self.clients.values())
        if waiting:
            return max(0.0, self._next_pass - time.monotonic())
        return 0.5  # timeouts are checked at least this often

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.fileobj is self.listener:
            self._accept()
        elif key.fileobj == self._wake_r:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        else:
            client = self.clients.get(key.fd)
            if client is not None and mask & selectors.EVENT_READ:
                self._read(client)
            client = self.clients.get(key.fd)
            if client is not None and mask & selectors.EVENT_WRITE:
                self._flush(client)

    def _accept(self) -> None:
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer = f"{addr[0]}:{addr[1]}"
        if len(self.clients) >= self.max_clients:
            log.warning("refusing VNC client %s: %d clients already", peer, self.max_clients)
            self.stats.refused += 1
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        session = VncSession(self.password, self.name, self.sink, self.source.snapshot,
                             self.resizer)
        client = Client(sock, peer, session, now, now, now)
        self.clients[sock.fileno()] = client
        self.stats.accepted += 1
        log.info("VNC client %s connected (%d now)", peer, len(self.clients))
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._flush(client)

    def _read(self, client: Client) -> None:
        if client.session.closing:
            return
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"receive failed: {exc.strerror or exc}")
            return
        if not data:
            self._drop(client, "disconnected", level=logging.INFO)
            return
        client.last_read = time.monotonic()
        had_request = client.session.request is not None
        try:
            client.session.feed(data)
        except RfbError as exc:
            self._drop(client, f"protocol error: {exc}")
            return
        except Exception:  # a bug must cost one client, not the VNC server
            log.exception("VNC client %s: internal error", client.peer)
            self._drop(client, "internal error")
            return
        if client.session.closing:
            self.stats.auth_failures += 1
            log.warning("VNC client %s: %s", client.peer, client.session.close_reason)
        if client.session.request is not None and not had_request:
            self._due = True  # answer a new request now, not at the next tick
        self._flush(client)

    def _flush(self, client: Client) -> None:
        out = client.session.out
        while out:
            try:
                sent = client.sock.send(memoryview(out)[:SEND_SIZE])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(client, f"send failed: {exc.strerror or exc}")
                return
            del out[:sent]
            self.stats.bytes_sent += sent
            client.last_write = time.monotonic()
        if not out and client.session.closing:
            self._drop(client, client.session.close_reason)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
        self._sel.modify(client.sock, events, None)

    # -- frames and timeouts -----------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._due or now >= self._next_pass:
            self._due = False
            self._next_pass = now + self.frame_interval
            self._offer_frames()
        for client in list(self.clients.values()):
            reason = self._overdue(client, now)
            if reason:
                self._drop(client, reason)

    def _offer_frames(self) -> None:
        ready = [c for c in self.clients.values()
                 if c.session.wants_update and not c.session.out]
        if not ready:
            return
        frame, cursor = self.source.snapshot(), self.source.cursor()
        for client in ready:
            try:
                sent = client.session.make_update(frame, cursor)
            except Exception:  # as in _read: one client pays for a bug, not all
                log.exception("VNC client %s: internal error", client.peer)
                self._drop(client, "internal error")
                continue
            if sent:
                self.stats.updates += 1
                self._flush(client)

    def _overdue(self, client: Client, now: float) -> str | None:
        limit = self.client_timeout
        s = client.session
        if s.state is not ClientState.NORMAL and now - client.since > limit:
            return f"no complete handshake within {limit:g} s"
        if s.partial and now - client.last_read > limit:
            return f"half a message, the rest not sent within {limit:g} s"
        if s.out and now - client.last_write > limit:
            return f"not reading its updates for {limit:g} s"
        return None

    def _drop(self, client: Client, reason: str, level: int = logging.WARNING) -> None:
        if self.clients.pop(client.sock.fileno(), None) is None:
            return
        log.log(level, "VNC client %s dropped: %s", client.peer, reason)
        if level != logging.INFO:
            self.stats.dropped += 1
            kind = reason.split(":")[0]
            self.stats.drop_reasons[kind] = self.stats.drop_reasons.get(kind, 0) + 1
        self._sel.unregister(client.sock)
        client.sock.close()

    def _close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client, "server stopping", level=logging.INFO)
        self._sel.close()
        self.listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
