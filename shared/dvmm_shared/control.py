"""The control plane: ZeroMQ sockets carrying msgpack maps (see DESIGN.md).

Owns the wire conventions and nothing about what the commands do:

* **commands** — a :class:`CommandServer` (REP, on its own daemon thread)
  answers ``{"cmd": NAME, ...args}`` with ``{"ok": True, **result}`` or
  ``{"ok": False, "error": "one line"}``; :func:`command` is the client (a
  fresh REQ socket per call, so a lost reply never wedges the next call);
* **events** — an :class:`EventPublisher` (PUB) sends ``{"event", "seq",
  "ts", **fields}`` and keeps the last 1000 in :attr:`EventPublisher.history`;
  an :class:`EventSubscriber` (SUB) receives them.

Endpoints live in the VM's runtime directory: :func:`runtime_endpoint`
(``ipc://RUNTIME/NAME.ctl``, one per backend and ``core``) and
:func:`events_endpoint` (``ipc://RUNTIME/events``).  The ``ipc://`` socket
files are removed when their server or publisher closes.

PUB/SUB "slow joiner": ZeroMQ connects a subscriber asynchronously, and a PUB
socket drops whatever it sends before the connection (and the subscription)
has reached it.  A subscriber therefore misses events published just before
and just after it connects.  A client that must not miss one (``dvmm events
--history``) subscribes first, then asks the publisher's owner for its
history over a command (the core answers ``events`` with ``{"events":
[...]}``) and drops live events whose ``seq`` it has already printed.
:meth:`EventSubscriber.wait_connected` narrows the window (it waits for the
handshake before the history is fetched); :meth:`EventPublisher.wait_subscribed`
closes it from the publisher's side (XPUB sees each subscription arrive).

fds never travel here (they go over vhost-user sockets); every received map
is hostile input: a malformed request gets an error reply and the server keeps
serving.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import zmq

log = logging.getLogger("dvmm.control")

HISTORY_LEN = 1000
MAX_MESSAGE = 1 << 20  # a command or event is a small map; refuse anything bigger

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """A control-plane failure, as one line a user can act on."""


def runtime_endpoint(runtime_dir: str, name: str) -> str:
    """The command endpoint of backend ``name`` (or ``"core"``) of one VM."""
    return f"ipc://{runtime_dir}/{name}.ctl"


def events_endpoint(runtime_dir: str) -> str:
    """The core's event stream of one VM."""
    return f"ipc://{runtime_dir}/events"


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint, else None."""
    return endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else None


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    """Decode one msgpack value; any malformation raises :class:`ControlError`."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, ...)
        raise ControlError(f"not a msgpack value: {type(exc).__name__}") from None


#: How long closing a publisher waits for queued events to leave (ms).
PUBLISH_LINGER_MS = 500

def _one_line(text: str) -> str:
    return " ".join(text.split()) or "error"


def _bind(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str,
          options: dict[int, int] | None = None) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise ControlError(f"cannot bind {endpoint}: {zmq.strerror(exc.errno or 0)}") from None
    return sock


def _close_bound(ctx: zmq.Context[zmq.Socket[bytes]], socks: list[zmq.Socket[bytes]],
                 endpoint: str, linger: int = 0) -> None:
    """Close sockets on a private context and remove the ipc socket file.

    ``ctx.term()`` returns only once the I/O thread has torn down the
    listener (which unlinks the file), so the file is gone when this returns;
    the explicit unlink covers a libzmq that leaves it behind."""
    for sock in socks:
        sock.close(linger=linger)
    ctx.term()
    path = ipc_path(endpoint)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class EventPublisher:
    """The PUB side of an event stream; thread-safe (one lock around the socket).

    An XPUB socket (verbose), so the publisher sees each subscription arrive:
    :meth:`wait_subscribed` lets a caller (a test, a core that must not lose
    its first events) wait for a subscriber instead of guessing."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_LEN)
        self.subscriptions = 0  # subscribe requests seen so far (never decreases)
        self._lock = threading.Lock()
        self._seq = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        try:
            self._sock: zmq.Socket[bytes] | None = _bind(self._ctx, zmq.XPUB, endpoint,
                                                         {zmq.XPUB_VERBOSE: 1})
        except ControlError:
            self._ctx.term()
            raise

    def publish(self, event: str, **fields: Any) -> dict[str, Any]:
        """Send one event; returns the map sent (also appended to history)."""
        with self._lock:
            self._seq += 1
            msg: dict[str, Any] = {"event": event, "seq": self._seq, "ts": time.time(), **fields}
            data = pack(msg)
            self.history.append(msg)
            if self._sock is not None:
                self._drain(self._sock, 0)
                # PUB never blocks: past the high-water mark a slow subscriber loses events
                with contextlib.suppress(zmq.Again):
                    self._sock.send(data, zmq.NOBLOCK)
            return msg

    def wait_subscribed(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Whether ``count`` subscriptions have reached the publisher within ``timeout``.

        Once a subscription is seen here, every later event reaches that subscriber."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._sock is None:
                    return False
                self._drain(self._sock, 0)
                if self.subscriptions >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._drain(self._sock, min(50, int(left * 1000) + 1))

    def _drain(self, sock: zmq.Socket[bytes], wait_ms: int) -> None:
        """Count subscribe messages (first byte 1), waiting up to ``wait_ms`` for one."""
        while sock.poll(wait_ms):
            if sock.recv()[:1] == b"\x01":
                self.subscriptions += 1
            wait_ms = 0

    def close(self) -> None:
        with self._lock:
            if self._sock is None:
                return
            sock, self._sock = self._sock, None
        # The last events (``vm-stopped``) still reach connected subscribers.
        _close_bound(self._ctx, [sock], self.endpoint, linger=PUBLISH_LINGER_MS)


class EventSubscriber:
    """The SUB side: every event of one publisher (see the slow-joiner note above)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._monitor: zmq.Socket[bytes] | None = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(endpoint)

    def wait_connected(self, timeout: float = 2.0) -> bool:
        """Whether the connection to the publisher is up (handshake done) within
        ``timeout``.  The subscription is sent right after the handshake, so
        from shortly after this returns True, events reach this subscriber."""
        if self._monitor is None:
            return True
        if not self._monitor.poll(int(timeout * 1000)):
            return False
        self._stop_monitor()
        return True

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event map, or None after ``timeout`` seconds (None: wait forever).

        A message that is not a map with an ``event`` name is skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if wait is None else int(wait * 1000)):
                return None
            data = self._sock.recv()
            try:
                msg = unpack(data)
            except ControlError:
                continue
            if isinstance(msg, dict) and isinstance(msg.get("event"), str):
                return msg

    def close(self) -> None:
        self._stop_monitor()
        self._sock.close(linger=0)


def command(endpoint: str, cmd: str, timeout: float = 2.0, **args: Any) -> dict[str, Any]:
    """Send one command and return the reply map (``ok`` is True).

    Raises :class:`ControlError` when the endpoint does not exist, when no
    reply comes within ``timeout`` seconds, or when the server answers with
    an error (its text is the exception's message)."""
    path = ipc_path(endpoint)
    if path is not None and not os.path.exists(path):
        raise ControlError(f"no control endpoint at {path}")
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        sock.connect(endpoint)
        sock.send(pack({**args, "cmd": cmd}))
        if not sock.poll(int(timeout * 1000)):
            raise ControlError(f"{cmd}: no answer from {endpoint} within {timeout:g} s")
        reply = unpack(sock.recv())
    finally:
        sock.close(linger=0)
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"{cmd}: malformed reply from {endpoint}")
    if not reply["ok"]:
        raise ControlError(_one_line(str(reply.get("error", "failed"))))
    return reply


class CommandServer:
    """A REP endpoint answering commands on its own daemon thread.

    ``handlers`` maps a command name to a function that receives the whole
    request map (``cmd`` included) and returns the result map.  A handler
    raising :class:`ControlError` or any other exception produces an error
    reply; the server keeps serving.  Handlers run on the server thread, one
    at a time."""

    def __init__(self, endpoint: str, handlers: dict[str, Handler]) -> None:
        self.endpoint = endpoint
        self.handlers = dict(handlers)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self._wake = f"inproc://wake-{id(self):x}"
        try:
            self._sock = _bind(self._ctx, zmq.REP, endpoint)
        except ControlError:
            self._ctx.term()
            raise
        self._wake_rx: zmq.Socket[bytes] = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake)
        self._lock = threading.Lock()
        self._closed = False
        self._then: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._serve, name=f"control {endpoint}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def exit_after_reply(self, then: Callable[[], None]) -> None:
        """From a handler: stop serving once the current reply has been
        flushed to the client, then call ``then`` (on the server thread).

        This is how ``fault kill`` answers before the process dies: closing
        the private context waits until the reply has left the process."""
        self._then = then

    def close(self) -> None:
        """Stop the thread, close the socket and remove the ipc file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            wake: zmq.Socket[bytes] = self._ctx.socket(zmq.PAIR)
            wake.connect(self._wake)
            wake.send(b"")
            self._thread.join()
            wake.close(linger=0)
        _close_bound(self._ctx, [self._sock, self._wake_rx], self.endpoint)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_rx in ready:
                return
            if self._sock in ready:
                self._sock.send(self._answer(self._sock.recv()))
                if self._then is not None:
                    self._finish_and_exit(self._then)
                    return

    def _finish_and_exit(self, then: Callable[[], None]) -> None:
        with self._lock:
            self._closed = True
        self._sock.close(linger=2000)  # the reply leaves before ctx.term() returns
        self._wake_rx.close(linger=0)
        _close_bound(self._ctx, [], self.endpoint)
        then()

    def _answer(self, data: bytes) -> bytes:
        try:
            request = unpack(data)
            reply = {"ok": True, **self._dispatch(request)}
            return pack(reply)
        except ControlError as exc:
            return pack({"ok": False, "error": _one_line(str(exc))})
        except Exception as exc:  # a handler bug or an unpackable result: still one reply
            log.debug("control command failed", exc_info=True)
            return pack({"ok": False, "error": _one_line(f"{type(exc).__name__}: {exc}")})

    def _dispatch(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise ControlError(f"request is a {type(request).__name__}, not a map")
        if not all(isinstance(key, str) for key in request):
            raise ControlError("request keys must be strings")
        name = request.get("cmd")
        if not isinstance(name, str):
            raise ControlError("request has no 'cmd' string")
        handler = self.handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            raise ControlError(f"unknown command {name[:64]!r} (known: {known})")
        result = handler(request)
        if not isinstance(result, dict):
            raise ControlError(f"{name}: handler returned a {type(result).__name__}")
        return result
