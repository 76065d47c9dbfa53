"""Extra fds a backend watches on the daemon's loop (a TAP for net RX/TX).

Owns the callbacks per fd and event and their registration in the daemon's
selector (tagged ``("extra", fd)`` so the loop hands readiness back to
:meth:`FdWatches.on_ready`).  Level triggered, like the selector; a fd the
daemon itself watches (socket, kick eventfds) cannot be taken.  The
:class:`~.session.Session` lends this to a backend as part of its
:class:`~.backend.BackendHost` for one frontend connection.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable

_EVENTS = (selectors.EVENT_READ, selectors.EVENT_WRITE)


class FdWatches:
    """Callbacks on extra fds, registered in one selector."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.sel = selector
        self._cbs: dict[int, dict[int, Callable[[], None]]] = {}

    def watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is ready for ``events`` (level triggered)."""
        if events not in _EVENTS:
            raise ValueError(f"watch events must be EVENT_READ or EVENT_WRITE, not {events}")
        cbs = self._cbs.get(fd)
        if cbs is None:
            if fd in self.sel.get_map():
                raise ValueError(f"fd {fd} is already watched by the daemon")
            self._cbs[fd] = {events: callback}
            self.sel.register(fd, events, ("extra", fd))
            return
        cbs[events] = callback
        self.sel.modify(fd, _mask(cbs), ("extra", fd))

    def unwatch(self, fd: int, events: int = selectors.EVENT_READ | selectors.EVENT_WRITE
                ) -> None:
        cbs = self._cbs.get(fd)
        if cbs is None:
            return
        for ev in _EVENTS:
            if ev & events:
                cbs.pop(ev, None)
        if cbs:
            self.sel.modify(fd, _mask(cbs), ("extra", fd))
        else:
            del self._cbs[fd]
            self.sel.unregister(fd)

    def on_ready(self, fd: int, mask: int) -> None:
        """``fd`` is ready: run the callbacks still registered for it."""
        for ev in _EVENTS:
            if mask & ev:
                callback = self._cbs.get(fd, {}).get(ev)
                if callback is not None:
                    callback()

    def clear(self) -> None:
        """Drop every watch (whatever the backend did not unwatch)."""
        for fd in list(self._cbs):
            self.unwatch(fd)


def _mask(callbacks: dict[int, Callable[[], None]]) -> int:
    mask = 0
    for ev in callbacks:
        mask |= ev
    return mask
