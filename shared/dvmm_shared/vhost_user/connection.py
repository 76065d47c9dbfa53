"""A vhost-user socket: whole messages in and out, with SCM_RIGHTS fds.

Owns framing on the Unix stream socket and the file descriptors that ride
along with a message.  Received fds belong to the caller once returned; fds
arriving with a message that fails to decode are closed here so a hostile
peer cannot leak them into us.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .message import HEADER, Header, MessageError, encode

# A message carries at most one fd per memory region (SET_MEM_TABLE).
MAX_FDS = 8


class ConnectionClosed(Exception):
    """The peer closed the socket (cleanly, or in the middle of a message)."""


@dataclass
class Message:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def take_fd(self) -> int | None:
        """Take ownership of the (first) fd; the rest, if any, are closed."""
        fd = self.fds.pop(0) if self.fds else None
        self.close_fds()
        return fd


class Connection:
    """One end of a vhost-user socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: str, timeout: float | None = None) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             reply: bool = False, need_reply: bool = False) -> None:
        data = encode(request, payload, reply=reply, need_reply=need_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv(self, timeout: float | None = None) -> Message:
        """Read one whole message.  Raises ConnectionClosed or MessageError;
        with ``timeout``, TimeoutError unless all of it arrives within that
        many seconds (a peer stalling mid-message cannot hold us)."""
        fds: list[int] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = self.sock.gettimeout()
        try:
            raw = self._recv_exact(HEADER.size, fds, deadline)
            header = Header.decode(raw)
            payload = self._recv_exact(header.size, fds, deadline) if header.size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            if deadline is not None:
                self.sock.settimeout(previous)
        return Message(header, payload, fds)

    def _recv_exact(self, n: int, fds: list[int], deadline: float | None) -> bytes:
        chunks: list[bytes] = []
        got = 0
        space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"message incomplete: {got} of {n} bytes")
                self.sock.settimeout(left)
            data, anc, flags, _addr = self.sock.recvmsg(n - got, space)
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
                    fds.extend(arr)
            if flags & socket.MSG_CTRUNC:
                raise MessageError("too many file descriptors with one message")
            if not data:
                if got or fds:
                    raise ConnectionClosed(f"peer closed the socket after {got} of {n} bytes")
                raise ConnectionClosed("peer closed the socket")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)
