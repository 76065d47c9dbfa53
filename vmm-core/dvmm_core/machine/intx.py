"""The INTx pump: the one place the core watches call eventfds itself.

With MSI-X enabled, a backend's call eventfd goes straight into KVM
(irqfd).  Firmware such as SeaBIOS leaves MSI-X off, and legacy INTx needs
the ISR register set before the line is raised, which only the core can do.
So while a device is in INTx mode its call eventfds are watched here, on
one thread for the whole machine, and each signal runs the device's
callback (set ISR, raise the level-triggered line).

The thread, its selector and its wake-up pipe are made by the first
``watch``: a machine without virtio devices (or before the firmware enables
one) has none of them, and the first guest instruction does not wait for them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import selectors

log = logging.getLogger("dvmm.intx")


class IntxPump:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = True
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    def _started(self) -> selectors.BaseSelector:
        """(lock held) The selector, the pipe and the thread, made once."""
        if self._sel is None:
            import selectors

            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sel.register(self._wake_r, selectors.EVENT_READ, None)
            self._thread = threading.Thread(target=self._loop, args=(self._sel,),
                                            name="intx-pump", daemon=True)
            self._thread.start()
        return self._sel

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        import selectors

        with self._lock:
            self._started().register(fd, selectors.EVENT_READ, callback)
        self._wake()

    def unwatch(self, fd: int) -> None:
        with self._lock:
            if self._sel is None:
                return
            try:
                self._sel.unregister(fd)
            except KeyError:
                pass
        self._wake()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _loop(self, sel: selectors.BaseSelector) -> None:
        while self._running:
            for key, _ in sel.select():
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    os.eventfd_read(int(key.fd))
                except (BlockingIOError, OSError):
                    continue
                try:
                    key.data()
                except Exception:  # a device bug must not kill interrupt delivery
                    log.exception("INTx callback failed")

    def close(self) -> None:
        self._running = False
        with self._lock:
            sel, thread = self._sel, self._thread
        if sel is None or thread is None:
            return
        self._wake()
        thread.join(timeout=2)
        sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
