"""The QMP server's sockets: clients accepted, read, written, and events fanned out.

Owns two threads and every QMP connection of the core:

* the **I/O thread** runs one selector over the listening sockets and the
  clients: it sends each new client the greeting, feeds what a client sends
  to its :class:`~.session.QmpSession`, queues the work items, and writes
  whatever is waiting for a client without ever blocking on one;
* the **executor thread** runs the work items one after another, all
  clients together, as QEMU's monitor does (qmp-spec.rst "Out-of-band
  execution": in-band commands run in order and replies come in issue
  order).  A command may take a while (``stop`` waits for the vCPUs);
  meanwhile the I/O thread still greets, reads and delivers events.

Hostile clients: a client with :data:`MAX_PENDING` commands queued is not
read until some complete (the spec's "the server will stop reading
requests"), so flooding costs it, not the core; a client that does not read
its replies or events is dropped once :data:`MAX_OUTPUT` bytes wait for it;
a client that never negotiates only holds one of :data:`MAX_CLIENTS` slots.
Events (:meth:`QmpServer.emit`) go only to clients past negotiation, and
only after the reply that ended it.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .protocol import ErrorClass, QmpError, event, failure
from .session import QmpSession

log = logging.getLogger("dvmm.qmp")

MAX_PENDING = 8
MAX_OUTPUT = 4 << 20
MAX_CLIENTS = 16
READ_SIZE = 64 << 10

SessionFactory = Callable[[], QmpSession]


class _Client:
    """One connection; every field but ``sock`` is guarded by the server lock."""

    def __init__(self, sock: socket.socket, session: QmpSession, label: str) -> None:
        self.sock = sock
        self.session = session
        self.label = label
        self.out = bytearray(session.greeting())
        self.pending = 0
        self.events = False  # negotiated, and the reply that said so is queued
        self.eof = False     # nothing more to read: close once replies are out
        self.dead = False
        self.mask = 0        # what the selector watches (I/O thread only)


class QmpServer:
    """QMP over the given listening sockets (see the module doc)."""

    def __init__(self, listeners: list[socket.socket], sessions: SessionFactory) -> None:
        self._listeners = listeners
        self._sessions = sessions
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._work: queue.SimpleQueue[tuple[_Client, Any] | None] = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = False
        self._draining = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for sock in self._listeners:
            self._selector.register(sock, selectors.EVENT_READ, sock)
        for target, name in ((self._io_loop, "qmp-io"), (self._exec_loop, "qmp-exec")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    # -- events -----------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any] | None = None,
             ts: float | None = None) -> None:
        """Deliver an event to every negotiated client (any thread, never blocks)."""
        line = event(name, data, ts)
        with self._lock:
            for client in self._clients.values():
                if client.events and not client.dead:
                    if len(client.out) + len(line) > MAX_OUTPUT:
                        log.warning("QMP client %s reads nothing: dropped", client.label)
                        client.dead = True
                    else:
                        client.out += line
        self._wake()

    # -- closing ------------------------------------------------------------------
    def close(self, flush: float = 2.0) -> None:
        """Stop taking commands, give clients ``flush`` seconds to receive
        what waits for them (the reply to ``quit``, SHUTDOWN), then close."""
        deadline = time.monotonic() + flush
        with self._lock:
            self._draining = True
            self._wake()
            while any((c.out or c.pending) and not c.dead for c in self._clients.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._drained.wait(left)
            self._closing = True
        self._wake()
        self._work.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        for client in list(self._clients.values()):
            self._drop(client)
        for sock in self._listeners:
            sock.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    # -- the I/O thread -----------------------------------------------------------
    def _io_loop(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._selector.select():
                    if key.data is None:
                        self._drain_wake()
                    elif isinstance(key.data, socket.socket):
                        self._accept(key.data)
                    else:
                        self._serve(key.data, mask)
                self._update()
        except Exception:  # never expected; the VM must not notice
            log.exception("QMP server stopped")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(False)
        with self._lock:
            if self._draining or len(self._clients) >= MAX_CLIENTS:
                self._refuse(sock)
                return
            client = _Client(sock, self._sessions(), str(peer) or "unix")
            self._clients[sock.fileno()] = client
        self._watch(client, selectors.EVENT_READ | selectors.EVENT_WRITE)
        log.info("QMP client connected (%s)", client.label)

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        try:
            sock.send(failure(QmpError("too many QMP clients (at most "
                                       f"{MAX_CLIENTS}); try again later")))
        except OSError:
            pass
        sock.close()

    def _serve(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._read(client)
        if mask & selectors.EVENT_WRITE:
            self._write(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with self._lock:
                client.eof = True
            return
        items = client.session.feed(data)
        with self._lock:
            client.pending += len(items)
        for item in items:
            self._work.put((client, item))

    def _write(self, client: _Client) -> None:
        with self._lock:
            data = bytes(client.out[:READ_SIZE])
        if not data:
            return
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            with self._lock:
                client.dead = True
            return
        with self._lock:
            del client.out[:sent]
            if not client.out:
                self._drained.notify_all()

    def _update(self) -> None:
        """Re-arm every client's interest; close the finished ones."""
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            with self._lock:
                done = client.dead or (client.eof and not client.pending and not client.out)
                want = selectors.EVENT_WRITE if client.out else 0
                if not (client.eof or self._draining) and client.pending < MAX_PENDING:
                    want |= selectors.EVENT_READ
            if done:
                self._drop(client)
            elif want != client.mask:
                self._watch(client, want)

    def _watch(self, client: _Client, want: int) -> None:
        """(I/O thread) Watch ``client`` for ``want``; 0: not at all until
        the executor finishes something (a selector cannot watch for nothing)."""
        if not want:
            self._selector.unregister(client.sock)
        elif client.mask:
            self._selector.modify(client.sock, want, client)
        else:
            self._selector.register(client.sock, want, client)
        client.mask = want

    def _drop(self, client: _Client) -> None:
        with self._lock:
            if self._clients.pop(client.sock.fileno(), None) is None:
                return
            client.dead = True
            self._drained.notify_all()
        if client.mask:
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()
        log.info("QMP client disconnected (%s)", client.label)

    # -- the executor thread ------------------------------------------------------
    def _exec_loop(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            client, item = work
            if client.dead:
                reply = b""
            elif self._draining:
                reply = failure(QmpError("the VM is shutting down", ErrorClass.GENERIC))
            else:
                reply = client.session.process(item)
            with self._lock:
                client.pending -= 1
                if not client.dead:
                    client.out += reply
                    client.events = client.session.negotiated
                self._drained.notify_all()
            self._wake()
