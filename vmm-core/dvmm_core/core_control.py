"""The core's end of the control plane: its event stream and command endpoint.

Owns two ZeroMQ endpoints in the VM's runtime directory (see
``../shared/DESIGN.md``):

* ``ipc://RUNTIME/events`` (PUB): every event of the supervisor (backend
  started / exited / restarted / given up), of the vhost-user links (device
  lost / restored / offline) and of the machine (guest reset, VM stopped),
  as msgpack maps with ``event``, ``seq`` and ``ts``;
* ``ipc://RUNTIME/core.ctl`` (REP): ``status`` (the VM and every backend),
  ``events`` (the recent history, for a client that joined late),
  ``fault`` (process faults through the supervisor: kill, stop, cont,
  restart; ``corrupt-msg``: one corrupted vhost-user message from the
  core's link to that backend) and ``input`` (key and pointer events from the display process
  for the machine's PS/2 keyboard and mouse, notes/display_interface.md).

The endpoints open in :meth:`CoreControl.start`, which the machine calls
once its vCPUs run: ZeroMQ (its import, a context with an I/O thread, two
binds, the REP thread) costs ~10-20 ms that the first guest instruction
does not wait for.  Events emitted before that wait in a buffer and are
published, with their original timestamps, when the publisher opens.

It does not own the backends' own command endpoints (each backend serves
``ipc://RUNTIME/NAME.ctl``; ``dvmm status`` and ``dvmm fault`` talk to them
directly) nor the meaning of any event (the sources decide that).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .supervisor import Supervisor, SupervisorError

if TYPE_CHECKING:
    from dvmm_shared.control import CommandServer, EventPublisher

    from .vhost_user_frontend import VhostUserLink

log = logging.getLogger("dvmm.control")


class CoreControl:
    """Event publisher plus the ``core.ctl`` command server of one VM."""

    def __init__(self, supervisor: Supervisor, links: Callable[[], list[VhostUserLink]],
                 vm_state: Callable[[], str]) -> None:
        self.supervisor = supervisor
        self._links = links
        self._vm_state = vm_state
        #: Where ``input`` events go (the machine's i8042); None: no keyboard.
        self.input: Callable[[Any], int] | None = None
        self._started = time.monotonic()
        self.publisher: EventPublisher | None = None
        self.server: CommandServer | None = None
        # Events before start(), with their time; the lock keeps their order.
        self._early: list[tuple[str, dict[str, Any], float]] = []
        self._closed = False
        self._lock = threading.Lock()
        #: In-process observers of every event (the QMP server), called on
        #: the emitting thread; they must not block.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def start(self) -> None:
        """Open ``events`` and ``core.ctl``; publish what happened before.
        Raises ``dvmm_shared.control.ControlError`` if they cannot be bound."""
        from dvmm_shared.control import (
            CommandServer,
            EventPublisher,
            events_endpoint,
            runtime_endpoint,
        )

        runtime = self.supervisor.runtime_dir
        with self._lock:
            publisher = EventPublisher(events_endpoint(runtime))
            early, self._early = self._early, []
            for event, fields, ts in early:
                publisher.publish(event, **{**fields, "ts": ts})
            self.publisher = publisher
        self.server = CommandServer(runtime_endpoint(runtime, "core"), {
            "status": self._status,
            "events": lambda req: {"events": self.history()},
            "fault": self._fault,
            "input": self._input,
        })
        self.server.start()

    def emit(self, event: str, fields: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event, fields)
            except Exception:  # an observer must never break the event's source
                log.exception("event listener failed for %s", event)
        with self._lock:
            if self.publisher is None:
                if not self._closed:
                    self._early.append((event, dict(fields), time.time()))
                return
            msg = self.publisher.publish(event, **fields)
        log.debug("event %s", msg)

    def history(self) -> list[dict[str, Any]]:
        """The events published so far (the publisher keeps the last 1000)."""
        with self._lock:
            if self.publisher is None:
                return [{"event": e, "ts": ts, **f} for e, f, ts in self._early]
            return list(self.publisher.history)

    # -- commands -----------------------------------------------------------
    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        links = {link.name: link for link in self._links()}
        backends = []
        for b in self.supervisor.backends:
            info = b.info()
            link = links.pop(b.name, None)
            if link is not None:
                info.update(link=link.state.value, restores=link.restores, rings=link.rings())
            backends.append(info)
        for link in links.values():  # external backends: only the link is ours
            backends.append({"name": link.name, "pid": None, "state": link.state.value,
                             "restarts": 0, "uptime": 0.0, "policy": "external",
                             "control": None, "external": True, "socket": link.path,
                             "last_exit": None, "given_up_reason": None,
                             "link": link.state.value, "restores": link.restores})
        return {"vm": {"pid": os.getpid(), "state": self._vm_state(),
                       "uptime": round(time.monotonic() - self._started, 3),
                       "runtime_dir": self.supervisor.runtime_dir},
                "backends": backends}

    def _fault(self, request: dict[str, Any]) -> dict[str, Any]:
        from dvmm_shared.control import ControlError

        name, action = request.get("name"), request.get("action")
        if not isinstance(name, str) or not isinstance(action, str):
            raise ControlError("fault needs 'name' and 'action' strings")
        if action == "corrupt-msg":
            return self._corrupt(name, request.get("mode", "version"))
        try:
            backend = self.supervisor.signal_backend(name, action)
        except SupervisorError as exc:
            raise ControlError(str(exc)) from None
        self.emit("fault-injected", {"name": name, "action": action, "pid": backend.pid})
        return {"name": name, "action": action, "pid": backend.pid}

    def _corrupt(self, name: str, mode: object) -> dict[str, Any]:
        """``corrupt-msg``: the link to ``name`` sends its backend one corrupted
        vhost-user message (:meth:`VhostUserLink.corrupt_message`)."""
        from dvmm_shared.control import ControlError

        link = next((lk for lk in self._links() if lk.name == name), None)
        if link is None:
            raise ControlError(f"no vhost-user link called {name!r}")
        try:
            sent = link.corrupt_message(mode if isinstance(mode, str) else "")
        except ValueError as exc:
            raise ControlError(f"corrupt-msg: {exc}") from None
        if not sent:
            raise ControlError(f"corrupt-msg: {name} is not connected ({link.state.value})")
        self.emit("fault-injected", {"name": name, "action": "corrupt-msg", "mode": mode})
        return {"name": name, "action": "corrupt-msg", "mode": mode}

    def _input(self, request: dict[str, Any]) -> dict[str, Any]:
        from dvmm_shared.control import ControlError

        if self.input is None:
            raise ControlError("this machine has no keyboard (run it with --display)")
        try:
            delivered = self.input(request.get("events"))
        except ValueError as exc:
            raise ControlError(f"input: {exc}") from None
        return {"delivered": delivered}

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        with self._lock:
            publisher, self.publisher = self.publisher, None
            self._early, self._closed = [], True
        if publisher is not None:
            publisher.close()
