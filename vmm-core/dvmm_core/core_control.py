"""The core's end of the control plane: its event stream and command endpoint.

Owns two ZeroMQ endpoints in the VM's runtime directory (see
``../shared/DESIGN.md``):

* ``ipc://RUNTIME/events`` (PUB): every event of the supervisor (backend
  started / exited / restarted / given up), of the vhost-user links (device
  lost / restored / offline) and of the machine (guest reset, VM stopped),
  as msgpack maps with ``event``, ``seq`` and ``ts``;
* ``ipc://RUNTIME/core.ctl`` (REP): ``status`` (the VM and every backend),
  ``events`` (the recent history, for a client that joined late) and
  ``fault`` (process faults through the supervisor: kill, stop, cont,
  restart).

It does not own the backends' own command endpoints (each backend serves
``ipc://RUNTIME/NAME.ctl``; ``dvmm status`` and ``dvmm fault`` talk to them
directly) nor the meaning of any event (the sources decide that).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from dvmm_shared.control import (
    CommandServer,
    ControlError,
    EventPublisher,
    events_endpoint,
    runtime_endpoint,
)

from .supervisor import Supervisor, SupervisorError
from .vhost_user_frontend import VhostUserLink

log = logging.getLogger("dvmm.control")


class CoreControl:
    """Event publisher plus the ``core.ctl`` command server of one VM."""

    def __init__(self, supervisor: Supervisor, links: Callable[[], list[VhostUserLink]],
                 vm_state: Callable[[], str]) -> None:
        self.supervisor = supervisor
        self._links = links
        self._vm_state = vm_state
        self._started = time.monotonic()
        runtime = supervisor.runtime_dir
        self.publisher = EventPublisher(events_endpoint(runtime))
        self.server = CommandServer(runtime_endpoint(runtime, "core"), {
            "status": self._status,
            "events": lambda req: {"events": list(self.publisher.history)},
            "fault": self._fault,
        })
        self.server.start()

    def emit(self, event: str, fields: dict[str, Any]) -> None:
        msg = self.publisher.publish(event, **fields)
        log.debug("event %s", msg)

    # -- commands -----------------------------------------------------------
    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        links = {link.name: link for link in self._links()}
        backends = []
        for b in self.supervisor.backends:
            info = b.info()
            link = links.pop(b.name, None)
            if link is not None:
                info.update(link=link.state.value, restores=link.restores)
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
        name, action = request.get("name"), request.get("action")
        if not isinstance(name, str) or not isinstance(action, str):
            raise ControlError("fault needs 'name' and 'action' strings")
        try:
            backend = self.supervisor.signal_backend(name, action)
        except SupervisorError as exc:
            raise ControlError(str(exc)) from None
        self.emit("fault-injected", {"name": name, "action": action, "pid": backend.pid})
        return {"name": name, "action": action, "pid": backend.pid}

    def close(self) -> None:
        self.server.close()
        self.publisher.close()
