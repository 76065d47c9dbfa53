"""virtio-input devices as vhost-user backends (virtio 1.2 section 5.8), and
where a VNC client's input goes.

Owns one device (:class:`InputDevice`: the keyboard or the tablet of
:mod:`.evdev`) served by its own vhost-user daemon: the config space the
driver selects items of (5.8.4: ``select``/``subsel`` written, the item
read back), the event queue it fills with events and the status queue it
drains (LED changes, 5.8.6.2).  Events come from the VNC thread through
:meth:`InputDevice.post` (never blocking it: a bounded queue, dropped and
counted past the bound) and are put in the driver's buffers on the
daemon's loop thread, one ``virtio_input_event`` per buffer, as the driver
posts them (5.8.6.1); a driver that posts none simply does not get them.

:class:`InputRouter` is the VNC server's input sink: keys go to the
virtio keyboard once a driver has started its event queue, pointer events
to the virtio tablet likewise, and everything else to the core as PS/2
(:mod:`.input`) -- one destination per event, as QEMU routes input to the
most recently activated handler, so a guest never sees a key twice.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dvmm_shared.chain import ChainReader, ChainWriter
from dvmm_shared.vhost_user.backend import BackendHost, VhostUserBackend
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_shared.virtqueue import ChainError, DescriptorChain, SplitQueue

from .evdev import (
    CONFIG_SIZE,
    EV_LED,
    EVENT,
    InputSpec,
    KeyboardState,
    TabletState,
    parse_event,
)
from .input import InputForwarder

log = logging.getLogger("dvmm.display.input")

VIRTIO_ID_INPUT = 18
EVENTQ, STATUSQ = 0, 1
MAX_PENDING = 1024  # events waiting for driver buffers


@dataclass
class InputDeviceStats:
    posted: int = 0
    delivered: int = 0
    dropped: int = 0
    status: int = 0
    bad_chains: int = 0
    leds: int = 0  # the LED bits the driver last set (EV_LED, bit = LED_* code)


class InputDevice(VhostUserBackend):
    """One virtio-input device (id 18): an event queue and a status queue."""

    max_queue_size = 1024

    def __init__(self, spec: InputSpec, max_pending: int = MAX_PENDING) -> None:
        self.spec = spec
        self.max_pending = max_pending
        self.stats = InputDeviceStats()
        self.select = self.subsel = 0
        #: A driver has started the event queue: input is routed here.
        self.active = False
        self._pending: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._host: BackendHost | None = None
        #: Runs a callable on the daemon's loop thread (set by the program).
        self.call_soon: Callable[[Callable[[], None]], None] | None = None

    @property
    def num_queues(self) -> int:
        return 2

    def features(self) -> int:
        return bit(VIRTIO_F_VERSION_1)

    def attach(self, host: BackendHost) -> None:
        self._host = host

    # -- config space (5.8.4, 5.8.5) --------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        data = self.spec.config(self.select, self.subsel)
        return data[offset:offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        """``select`` (offset 0) and ``subsel`` (1) are the only writable
        fields; QEMU writes the whole structure at offset 0, the dvmm core
        one byte at a time.  Anything past them is read-only and ignored."""
        if offset < 0 or offset >= CONFIG_SIZE:
            return
        for i, value in enumerate(data[:max(0, 2 - offset)]):
            if offset + i == 0:
                self.select = value
            else:
                self.subsel = value

    # -- the queues ---------------------------------------------------------------------
    def queue_started(self, index: int) -> None:
        if index == EVENTQ:
            self.active = True
            log.info("%s: driver ready", self.spec.kind)

    def queue_stopped(self, index: int) -> None:
        if index == EVENTQ:
            self.active = False

    def reset(self) -> None:
        self.active = False
        self.select = self.subsel = 0
        self._host = None
        with self._lock:
            self._pending.clear()

    def post(self, events: list[bytes]) -> None:
        """Queue events for the driver (any thread; never blocks for long)."""
        if not events:
            return
        with self._lock:
            room = self.max_pending - len(self._pending)
            if room < len(events):
                self.stats.dropped += len(events)
                return  # a whole group or nothing: half a report would confuse evdev
            self._pending.extend(events)
            self.stats.posted += len(events)
        if self.call_soon is not None:
            self.call_soon(self._flush)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _flush(self) -> None:
        host = self._host
        if host is not None:
            host.service_queue(EVENTQ)

    def process_queue(self, queue_index: int, queue: SplitQueue,
                      serve: Callable[[int, SplitQueue], bool]) -> bool:
        if queue_index == EVENTQ:
            return self._deliver(queue)
        return serve(queue_index, queue)

    def _deliver(self, queue: SplitQueue) -> bool:
        """Pending events into the driver's buffers, one each (5.8.6.1)."""
        pushed = False
        while self.pending():
            try:
                chain = queue.pop()
            except ChainError as exc:
                self.stats.bad_chains += 1
                queue.push(exc.head, 0)
                pushed = True
                continue
            if chain is None:
                break
            pushed = True
            writer = ChainWriter(chain.writable)
            if writer.remaining < EVENT.size:
                self.stats.bad_chains += 1
                queue.push(chain.head, 0)
                continue
            with self._lock:
                ev = self._pending.popleft()
            writer.write(ev)
            queue.push(chain.head, EVENT.size)
            self.stats.delivered += 1
        return pushed

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """A status-queue buffer: LED state and the like, going to the device."""
        self.stats.status += 1
        try:
            type_, code, value = parse_event(ChainReader(chain.readable).read(
                min(EVENT.size, chain.readable_len)))
        except ValueError as exc:
            self.stats.bad_chains += 1
            log.debug("%s status queue: %s", self.spec.kind, exc)
            return 0
        if type_ == EV_LED and 0 <= code < 16:
            self.stats.leds = self.stats.leds | 1 << code if value else self.stats.leds & ~(
                1 << code)
        return 0


class InputRouter:
    """The VNC server's input sink: virtio-input when a driver runs it, PS/2
    through the core otherwise (see the module doc)."""

    def __init__(self, ps2: InputForwarder, keyboard: InputDevice | None = None,
                 tablet: InputDevice | None = None,
                 screen: Callable[[], tuple[int, int]] = lambda: (1024, 768)) -> None:
        self.ps2 = ps2
        self.keyboard = keyboard
        self.tablet = tablet
        self.screen = screen
        self._keys = KeyboardState()
        self._pointer = TabletState()
        self._lock = threading.Lock()  # several VNC clients, one VNC thread: cheap

    def key(self, keysym: int, down: bool) -> None:
        kbd = self.keyboard
        if kbd is not None and kbd.active:
            with self._lock:
                kbd.post(self._keys.key(keysym, down))
            return
        self.ps2.key(keysym, down)

    def pointer(self, x: int, y: int, buttons: int) -> None:
        tablet = self.tablet
        if tablet is not None and tablet.active:
            with self._lock:
                tablet.post(self._pointer.pointer(x, y, buttons, self.screen()))
            return
        self.ps2.pointer(x, y, buttons)

    def cut_text(self, text: bytes) -> None:
        self.ps2.cut_text(text)
