"""Input from VNC clients to the core: batched, never blocking the VNC loop.

Owns the queue between the VNC loop (which calls :meth:`InputForwarder.key`
and :meth:`~InputForwarder.pointer` and returns at once) and a sender thread
that delivers the events to the core's control endpoint as one ``input``
command per batch (``{"type": "key", "keysym", "down"}`` and ``{"type":
"pointer", "x", "y", "buttons"}``, the display interface agreed with the
core).  A core that is slow or gone delays only this thread: the queue is
bounded (:data:`MAX_PENDING`), consecutive pointer moves with the same
buttons collapse into the last one, and past the bound the oldest events
are dropped and counted — a client is never stalled by the core.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from dvmm_shared.control import ControlError, command

log = logging.getLogger("dvmm.display.input")

MAX_PENDING = 4096
MAX_BATCH = 256  # events per command: far below the control plane's message size limit
SEND_TIMEOUT = 1.0
RETRY_PAUSE = 0.5  # after a failed send, so a missing core costs no CPU

Event = dict[str, Any]


@dataclass
class InputStats:
    keys: int = 0
    pointer: int = 0
    coalesced: int = 0
    sent: int = 0
    batches: int = 0
    dropped: int = 0
    failures: int = 0
    cut_text: int = 0


class InputForwarder:
    """Queues input events and sends them to ``endpoint`` from its own thread.

    Without an endpoint (``--core-control`` not given) events are counted
    and dropped."""

    def __init__(self, endpoint: str | None, timeout: float = SEND_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.stats = InputStats()
        self._queue: deque[Event] = deque()
        self._cond = threading.Condition()
        self._running = True
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="input", daemon=True)
        if endpoint is not None:
            self._thread.start()

    # -- the VNC side (never blocks for long: one short lock) -------------------------
    def key(self, keysym: int, down: bool) -> None:
        self.stats.keys += 1
        self._post({"type": "key", "keysym": keysym, "down": down})

    def pointer(self, x: int, y: int, buttons: int) -> None:
        self.stats.pointer += 1
        self._post({"type": "pointer", "x": x, "y": y, "buttons": buttons})

    def cut_text(self, text: bytes) -> None:
        # The core has no clipboard device: counted, not forwarded.
        self.stats.cut_text += 1

    def _post(self, event: Event) -> None:
        if self.endpoint is None:
            self.stats.dropped += 1
            return
        with self._cond:
            q = self._queue
            if (event["type"] == "pointer" and q and q[-1]["type"] == "pointer"
                    and q[-1]["buttons"] == event["buttons"]):
                q[-1] = event  # a move superseded before it left: only the end matters
                self.stats.coalesced += 1
            else:
                if len(q) >= MAX_PENDING:
                    q.popleft()
                    self.stats.dropped += 1
                q.append(event)
            self._cond.notify()

    # -- the sender thread ---------------------------------------------------------------
    def _run(self) -> None:
        assert self.endpoint is not None
        while True:
            with self._cond:
                while self._running and not self._queue:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft()
                         for _ in range(min(MAX_BATCH, len(self._queue)))]
            self._send(self.endpoint, batch)

    def _send(self, endpoint: str, batch: list[Event]) -> None:
        try:
            command(endpoint, "input", timeout=self.timeout, events=batch)
        except ControlError as exc:
            self.stats.failures += 1
            self.stats.dropped += len(batch)
            if not self._warned:
                self._warned = True
                log.warning("input events not delivered to the core: %s", exc)
            time.sleep(RETRY_PAUSE)
            return
        if self._warned:
            self._warned = False
            log.info("input events reach the core again")
        self.stats.sent += len(batch)
        self.stats.batches += 1

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 2.0) -> None:
        """Stop after sending what is queued (bounded by ``timeout``)."""
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
