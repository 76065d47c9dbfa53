"""The back-end channel of one vhost-user link, frontend side.

Owns the socket pair of ``VHOST_USER_PROTOCOL_F_BACKEND_REQ`` (QEMU's
``docs/interop/vhost-user.rst``, "Back-end communication"): the core keeps
one end and hands the other to the backend with ``SET_BACKEND_REQ_FD``;
the backend then sends requests of its own.  The only one the core acts on
is ``VHOST_USER_BACKEND_CONFIG_CHANGE_MSG``: the device's config space
changed (e.g. the display process was resized), so the cached config is
dropped and the guest gets a configuration-change interrupt (virtio 1.2
4.1.5.3).  Anything else is refused (``NEED_REPLY``: a non-zero ack) and
logged, and the channel keeps serving; input from the backend is hostile.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from dvmm_shared.vhost_user.connection import Connection, ConnectionClosed
from dvmm_shared.vhost_user.frontend import Frontend
from dvmm_shared.vhost_user.message import BackendRequest, MessageError, encode_u64

log = logging.getLogger("dvmm.backend_channel")

#: Seconds a backend may take to finish a message it started (it cannot
#: stall the link's monitor thread longer than this).
MESSAGE_TIMEOUT = 1.0


class BackendChannel:
    """The frontend end of a back-end channel, read by the link's monitor thread."""

    def __init__(self, name: str, fe: Frontend, on_config_change: Callable[[], None]) -> None:
        self.name = name
        self.on_config_change = on_config_change
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fe.set_backend_req_fd(theirs.fileno())
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(mine)
        self.closed = False
        self.config_changes = 0

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        self.closed = True
        self.conn.close()

    def serve_one(self) -> None:
        """Read and answer one request (the socket is readable)."""
        try:
            msg = self.conn.recv(timeout=MESSAGE_TIMEOUT)
        except (ConnectionClosed, TimeoutError, OSError) as exc:
            # The vhost-user socket's hang-up is what marks the backend lost;
            # a dead side channel only ends the channel.
            log.info("%s: back-end channel closed: %s", self.name, exc)
            self.close()
            return
        except MessageError as exc:
            log.warning("%s: bad back-end message: %s; channel closed", self.name, exc)
            self.close()
            return
        msg.close_fds()  # no request the core serves carries fds
        ok = msg.header.request == BackendRequest.CONFIG_CHANGE_MSG
        if ok:
            self.config_changes += 1
            log.info("%s: the backend says its config changed", self.name)
            self.on_config_change()
        else:
            log.warning("%s: back-end request %d not supported; refused", self.name,
                        msg.header.request)
        if msg.header.need_reply:
            try:
                self.conn.send(msg.header.request, encode_u64(0 if ok else 1), reply=True)
            except OSError as exc:
                log.info("%s: back-end channel: cannot reply: %s", self.name, exc)
                self.close()
