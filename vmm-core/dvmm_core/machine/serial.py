"""A 16550A UART (COM1 at 0x3F8, IRQ 4): the guest's serial console.

Owns the register file, the receive FIFO fed from the host (``feed``), the
transmit path to a byte ``sink`` and the level of the interrupt line.  It
does not own the host terminal, the stdin reader thread or the IRQ wiring:
the machine passes ``sink`` and ``irq`` in.

Transmission is instantaneous: a byte written to THR goes straight to the
sink, so LSR always shows THRE|TEMT (0x60) and firmware never waits
(notes/seabios.md §2).  There is no baud-rate timing, no line-status or
modem-status interrupt and no character-timeout interrupt: received data is
reported as IIR 0x04 (RDI) as soon as it is in the FIFO, which is what
Linux's 8250 driver and SeaBIOS need.  Register semantics follow the
National/TI PC16550D data sheet and QEMU's hw/char/serial.c where the sheet
is silent (THRE interrupt re-arming).

Thread safety: vCPU threads call ``read``/``write`` and the stdin thread
calls ``feed``; one lock serialises them, and ``irq`` is called with that
lock held so that level changes reach KVM in order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from .bus import Bus
from .platform import ByteDevice, LogOnce

log = logging.getLogger("dvmm.serial")

COM1_BASE = 0x3F8
COM1_IRQ = 4

# Register offsets (PC16550D §8).  DLAB=1 turns 0/1 into the divisor latch.
UART_RBR = 0  # read: receive buffer
UART_THR = 0  # write: transmit holding
UART_DLL = 0
UART_IER = 1
UART_DLM = 1
UART_IIR = 2  # read: interrupt identification
UART_FCR = 2  # write: FIFO control
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01   # received data available
UART_IER_THRI = 0x02  # transmit holding register empty
UART_IER_RLSI = 0x04  # receiver line status (never raised here)
UART_IER_MSI = 0x08   # modem status (never raised here)
# Bits 7:4 read 0 on a 16550A.  They must not echo: Linux probes bit 6 (UUE)
# and would take a UART that keeps it for an XScale port.
_IER_MASK = 0x0F

UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO = 0xC0  # both bits set: FIFOs enabled (16550A, not 16550)

UART_FCR_FE = 0x01    # FIFO enable
UART_FCR_RFR = 0x02   # clear receive FIFO
UART_FCR_XFR = 0x04   # clear transmit FIFO
_FCR_STORED = 0xC9    # FE, DMA mode and trigger level are kept

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
_MCR_MASK = 0x1F

UART_LSR_DR = 0x01
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40

UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
# A console is always "connected": carrier, data set ready, clear to send.
_MSR_CONNECTED = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS

RX_CAPACITY = 64 * 1024  # host-side buffer; a paste larger than this is cut


class Serial(ByteDevice):
    """One 16550A.  ``sink`` gets every transmitted byte; ``irq(level)`` is
    called when the interrupt output changes."""

    length = 8

    def __init__(self, sink: Callable[[bytes], None],
                 irq: Callable[[bool], None] | None = None) -> None:
        self._sink = sink
        self._irq = irq
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._warn = LogOnce(log)
        self._level = False
        self._set_power_on_state()

    def _set_power_on_state(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = UART_MCR_OUT2
        self.fcr = 0
        self.scr = 0
        self.dll = 0x0C  # 9600 baud, as a BIOS would leave it
        self.dlm = 0
        self._thr_pending = False
        self._rx.clear()

    def reset(self) -> None:
        """Power-on state (machine reset); lowers the interrupt line."""
        with self._lock:
            self._set_power_on_state()
            self._update_irq()

    def register(self, bus: Bus, base: int = COM1_BASE) -> None:
        bus.register(base, self.length, self, f"serial@{base:#x}")

    # --- host side ---------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue received bytes (any thread).  Returns how many were accepted."""
        with self._lock:
            room = max(0, RX_CAPACITY - len(self._rx))
            if len(data) > room:
                self._warn.warn("overrun", "serial: receive buffer full, dropping input")
            self._rx.extend(data[:room])
            self._update_irq()
            return min(room, len(data))

    # --- guest side --------------------------------------------------------

    def read_byte(self, offset: int) -> int:
        with self._lock:
            return self._read_reg(offset)

    def write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            self._write_reg(offset, value)

    def _read_reg(self, offset: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_RBR:
            return self.dll if dlab else self._read_rbr()
        if offset == UART_IER:
            return self.dlm if dlab else self.ier
        if offset == UART_IIR:
            return self._read_iir()
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            return UART_LSR_THRE | UART_LSR_TEMT | (UART_LSR_DR if self._rx else 0)
        if offset == UART_MSR:
            return self._msr()
        return self.scr

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_THR:
            if dlab:
                self.dll = value
            else:
                self._write_thr(value)
        elif offset == UART_IER:
            if dlab:
                self.dlm = value
            else:
                self._write_ier(value)
        elif offset == UART_FCR:
            self._write_fcr(value)
        elif offset == UART_LCR:
            self.lcr = value
        elif offset == UART_MCR:
            self.mcr = value & _MCR_MASK
        elif offset == UART_SCR:
            self.scr = value
        # LSR and MSR writes are factory-test registers: ignored.

    def _read_rbr(self) -> int:
        value = self._rx.popleft() if self._rx else 0
        self._update_irq()
        return value

    def _read_iir(self) -> int:
        ident = self._pending()
        if ident == UART_IIR_THRI:
            # PC16550D table IV: reading IIR when it reports THRE clears it.
            self._thr_pending = False
            self._update_irq()
        return ident | (UART_IIR_FIFO if self.fcr & UART_FCR_FE else 0)

    def _write_thr(self, value: int) -> None:
        # Writing THR clears the THRE interrupt; the byte leaves at once and
        # THR is empty again, which re-arms it.  Lowering then raising the
        # line gives the edge-triggered ISA IRQ a fresh edge (QEMU does too).
        self._thr_pending = False
        self._update_irq()
        if self.mcr & UART_MCR_LOOP:
            if len(self._rx) < RX_CAPACITY:
                self._rx.append(value)
        else:
            self._transmit(value)
        self._thr_pending = True
        self._update_irq()

    def _transmit(self, value: int) -> None:
        try:
            self._sink(bytes((value,)))
        except OSError as exc:
            self._warn.warn("sink", "serial: output sink failed: %s", exc)

    def _write_ier(self, value: int) -> None:
        changed = (self.ier ^ value) & _IER_MASK
        self.ier = value & _IER_MASK
        if changed & UART_IER_THRI:
            # Enabling THRI while THR is empty raises THRE at once (Linux's
            # UART_BUG_THRE probe and SeaBIOS's COM detection rely on it);
            # only the rising edge re-arms, as in QEMU and Bochs.
            self._thr_pending = bool(self.ier & UART_IER_THRI)
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & UART_FCR_FE:
            value |= UART_FCR_RFR | UART_FCR_XFR  # toggling FE clears both FIFOs
        if value & UART_FCR_RFR:
            self._rx.clear()
        if value & UART_FCR_XFR:
            self._thr_pending = True
        self.fcr = value & _FCR_STORED
        self._update_irq()

    def _msr(self) -> int:
        if not self.mcr & UART_MCR_LOOP:
            return _MSR_CONNECTED
        # Loopback (PC16550D §8.6): RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        msr = UART_MSR_CTS if self.mcr & UART_MCR_RTS else 0
        msr |= UART_MSR_DSR if self.mcr & UART_MCR_DTR else 0
        msr |= UART_MSR_RI if self.mcr & UART_MCR_OUT1 else 0
        msr |= UART_MSR_DCD if self.mcr & UART_MCR_OUT2 else 0
        return msr

    def _pending(self) -> int:
        """The highest-priority enabled pending interrupt (PC16550D table IV)."""
        if self.ier & UART_IER_RDI and self._rx:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self._thr_pending:
            return UART_IIR_THRI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending() != UART_IIR_NO_INT
        if level != self._level:
            self._level = level
            if self._irq is not None:
                self._irq(level)

    @property
    def irq_level(self) -> bool:
        """The current level of the interrupt output."""
        return self._level
