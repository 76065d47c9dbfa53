"""The small fixed-port devices of the PC platform, and byte-register plumbing.

Owns the devices that are a handful of bytes of state: the fast A20 /
reset port 0x92, the PIIX reset control register 0xCF9, the Bochs/QEMU
debug console 0x402 (the firmware log) and the POST code port 0x80 (the
i8042 keyboard controller has its own module, ``i8042``).  It also owns two helpers the
other 8-bit devices share: :class:`ByteDevice` (wider port accesses split into
byte accesses, as the ISA bus does) and :class:`PortWindow` (one device
answering two disjoint port ranges), plus :class:`LogOnce`.

It does not decide what a reset *does*: that is the ``on_reset`` callback the
machine passes in.  Every device here takes hostile guest input and never
raises on it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable

from .bus import Bus, BusDevice

log = logging.getLogger("dvmm.platform")


class LogOnce:
    """Log a guest misbehaviour once per key, so a hostile guest cannot flood the log."""

    _MAX_KEYS = 256

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[Hashable] = set()

    def warn(self, key: Hashable, msg: str, *args: object) -> None:
        if key in self._seen or len(self._seen) >= self._MAX_KEYS:
            return
        self._seen.add(key)
        self._log.warning(msg, *args)


class ByteDevice(ABC):
    """A device of ``length`` one-byte registers.

    An ``inw``/``inl`` on an 8-bit ISA device is split by the bus into byte
    cycles at consecutive ports; do the same, so a wider access touches
    each register once.  Bytes beyond the device read as 0xFF (open bus).
    """

    length: int = 1

    @abstractmethod
    def read_byte(self, offset: int) -> int: ...

    @abstractmethod
    def write_byte(self, offset: int, value: int) -> None: ...

    def read(self, offset: int, size: int) -> int:
        if size == 1 and 0 <= offset < self.length:  # the usual access: one register
            return self.read_byte(offset) & 0xFF
        value = 0
        for i in range(max(size, 0)):
            reg = offset + i
            byte = self.read_byte(reg) & 0xFF if 0 <= reg < self.length else 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and 0 <= offset < self.length:  # the usual access: one register
            self.write_byte(offset, value & 0xFF)
            return
        for i in range(max(size, 0)):
            reg = offset + i
            if 0 <= reg < self.length:
                self.write_byte(reg, (value >> (8 * i)) & 0xFF)


class PortWindow:
    """Forward accesses to ``device`` with ``delta`` added to the offset.

    Lets one device own ports that are not contiguous (0x60 and 0x64;
    0x510 and 0x514) without claiming the ports in between.
    """

    def __init__(self, device: BusDevice, delta: int) -> None:
        self.device = device
        self.delta = delta

    def read(self, offset: int, size: int) -> int:
        return self.device.read(offset + self.delta, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.write(offset + self.delta, size, value)


# --- port 0x92 ---------------------------------------------------------------

FAST_A20_PORT = 0x92
_A20_ENABLE = 0x02
_FAST_RESET = 0x01


class FastA20(ByteDevice):
    """System control port A (0x92): bit 1 A20 gate, bit 0 fast reset.

    KVM has no A20 masking, so A20 always reads as enabled (0x02;
    notes/seabios.md §2).  A 0 -> 1 transition of bit 0 resets the machine,
    as QEMU's port92 does.
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._value = 0

    def read_byte(self, offset: int) -> int:
        return (self._value & ~_FAST_RESET & 0xFF) | _A20_ENABLE

    def write_byte(self, offset: int, value: int) -> None:
        old, self._value = self._value, value
        if value & _FAST_RESET and not old & _FAST_RESET:
            self._value &= ~_FAST_RESET
            self._on_reset()

    def reset(self) -> None:
        self._value = 0

    def register(self, bus: Bus) -> None:
        bus.register(FAST_A20_PORT, 1, self, "port92")


# --- 0xCF9 -------------------------------------------------------------------

RESET_CONTROL_PORT = 0xCF9
RCR_SYS_RST = 0x02  # 1 = hard reset when RST_CPU is set
RCR_RST_CPU = 0x04  # 0 -> 1 starts the reset


class ResetControl(ByteDevice):
    """PIIX3 reset control register (0xCF9).

    Writing RST_CPU (bit 2) resets: with SYS_RST (bit 1) a hard reset,
    without it a soft one; both restart the machine here, as in QEMU.
    Linux writes ``cf9 | 2`` and then ``cf9 | 6`` (or 0x0E), SeaBIOS 0x02
    then 0x06 (notes/seabios.md §2).  Reads return the last value written
    with RST_CPU cleared.

    Registered alone on 0xCF9, which sits inside the 32-bit PCI address
    latch 0xCF8: that latch only accepts dword accesses at 0xCF8, so the two
    never conflict (the same split QEMU makes).
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._value = 0

    def read_byte(self, offset: int) -> int:
        return self._value

    def write_byte(self, offset: int, value: int) -> None:
        self._value = value & ~RCR_RST_CPU & 0xFF
        if value & RCR_RST_CPU:
            self._on_reset()

    def reset(self) -> None:
        self._value = 0

    def register(self, bus: Bus) -> None:
        bus.register(RESET_CONTROL_PORT, 1, self, "reset-control")


# --- 0x402 -------------------------------------------------------------------

DEBUGCON_PORT = 0x402
DEBUGCON_MAGIC = 0xE9  # SeaBIOS's paravirt.c checks for it before logging


class DebugCon(ByteDevice):
    """The QEMU/Bochs debug console: the firmware's log channel.

    Reads return 0xE9 (without it SeaBIOS prints only its banner).  Bytes
    written are collected into lines; each complete line, newline included,
    goes to ``sink``.  A line longer than ``max_line`` is passed on in
    pieces so a guest cannot grow the buffer without bound.
    """

    def __init__(self, sink: Callable[[bytes], None], max_line: int = 4096) -> None:
        self._sink = sink
        self._max_line = max_line
        self._buf = bytearray()

    def read_byte(self, offset: int) -> int:
        return DEBUGCON_MAGIC

    def write_byte(self, offset: int, value: int) -> None:
        self._buf.append(value)
        if value == 0x0A or len(self._buf) >= self._max_line:
            self.flush()

    def flush(self) -> None:
        """Pass on whatever partial line is buffered."""
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            self._sink(data)

    def register(self, bus: Bus) -> None:
        bus.register(DEBUGCON_PORT, 1, self, "debugcon")


# --- 0x80 --------------------------------------------------------------------

POST_CODE_PORT = 0x80


class PostCode(ByteDevice):
    """The POST diagnostic port.  Writes are remembered (``last``) and
    otherwise ignored; Linux also uses it as an I/O delay (``outb 0x80``)."""

    def __init__(self) -> None:
        self.last = 0

    def read_byte(self, offset: int) -> int:
        return 0xFF

    def write_byte(self, offset: int, value: int) -> None:
        self.last = value

    def write(self, offset: int, size: int, value: int) -> None:
        """One call, not two: Linux's ``outb_p`` I/O delays make this the
        most written port of all (the range is one byte: the low byte lands)."""
        self.last = value & 0xFF

    def register(self, bus: Bus) -> None:
        bus.register(POST_CODE_PORT, 1, self, "post-code")
