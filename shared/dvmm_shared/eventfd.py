"""eventfd helpers: the kick and call notifications of vhost-user.

A kick eventfd is signalled by the driver side (KVM ioeventfd, or a test
frontend) and read by the backend; a call eventfd is signalled by the backend
and consumed by KVM (irqfd) or a test frontend.
"""

from __future__ import annotations

import os


class EventFd:
    """An owned, non-blocking, close-on-exec eventfd."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def signal(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the reader is already due to wake

    def consume(self) -> int:
        """Read and reset the counter; 0 when it was not signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
