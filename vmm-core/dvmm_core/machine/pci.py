"""Conventional PCI: configuration space, BARs, bus 0 and config mechanism #1.

Owns the 256-byte type-0 configuration header of every device (with the
masks that decide which bits a guest may write), BAR sizing and the
tracking of where each BAR is decoded, the capability list, the bus-0 slot
table, the 0xCF8/0xCFC configuration ports, and the two chipset functions
firmware looks for: the i440FX host bridge (PAM registers) and the PIIX3
ISA bridge (PIRQ routing).  References: PCI Local Bus Specification 3.0
§6 (configuration space), §3.2.2.3.2 (mechanism #1); QEMU hw/pci/pci.c
(``pci_bar_address``), hw/pci-host/i440fx.c, hw/isa/piix.c; SeaBIOS
src/fw/pciinit.c.

It does not own what a BAR maps to: a device learns through
:meth:`PciDevice.bar_changed` that its BAR appeared, moved or vanished and
(un)registers its MMIO/port handlers, ioeventfds and so on itself.  Only
function 0 of each slot on bus 0 exists; everything else reads all ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import NamedTuple

from .bus import Bus

log = logging.getLogger("dvmm.pci")

# Type-0 header offsets (PCI 3.0 §6.1).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09  # 24-bit class code: prog-if, subclass, class
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_CONFIG_SPACE_SIZE = 256
PCI_CAP_START = 0x40  # first byte after the standard header

PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400
_COMMAND_WMASK = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
                  | PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)

PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
_STATUS_W1C = 0xF900  # parity/abort/SERR error bits: write 1 to clear (§6.2.3)

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_ROM_ADDRESS_ENABLE = 0x01

PCI_HEADER_TYPE_MULTI_FUNCTION = 0x80
PCI_NUM_BARS = 6
ROM_SLOT = 6  # the index bar_changed uses for the expansion ROM BAR

PCI_CONFIG_ADDRESS_PORT = 0xCF8
PCI_CONFIG_DATA_PORT = 0xCFC
_CONFIG_ENABLE = 0x80000000

_IO_SPACE_END = 0x10000


class BarKind(StrEnum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"
    ROM = "rom"


class Bar(NamedTuple):
    """A BAR: ``index`` 0-5 (6 for the ROM), power-of-two ``size``."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, on purpose
    size: int
    kind: BarKind
    prefetch: bool = False

    @property
    def offset(self) -> int:
        return PCI_ROM_ADDRESS if self.kind is BarKind.ROM else PCI_BASE_ADDRESS_0 + 4 * self.index

    @property
    def dwords(self) -> int:
        return 2 if self.kind is BarKind.MEM64 else 1

    @property
    def flags(self) -> int:
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        if self.kind is BarKind.ROM:
            return 0
        prefetch = PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0
        return prefetch | (PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0)

    @property
    def address_mask(self) -> int:
        """Writable address bits of the whole (32- or 64-bit) register."""
        low_bits = {BarKind.IO: 0x3, BarKind.ROM: 0x7FF}.get(self.kind, 0xF)
        width = 64 if self.kind is BarKind.MEM64 else 32
        return ~(self.size - 1) & ~low_bits & ((1 << width) - 1)

    @property
    def limit(self) -> int:
        """Where the BAR must end to be decodable."""
        if self.kind is BarKind.IO:
            return _IO_SPACE_END
        return 1 << 64 if self.kind is BarKind.MEM64 else 1 << 32


_MIN_SIZE = {BarKind.IO: 4, BarKind.MEM32: 16, BarKind.MEM64: 16, BarKind.ROM: 2048}
# An I/O BAR is at most 256 bytes (PCI 3.0 §6.2.5.1).
_MAX_SIZE = {BarKind.IO: 256, BarKind.MEM32: 1 << 31,
             BarKind.MEM64: 1 << 63, BarKind.ROM: 1 << 24}


class PciConfig:
    """A 256-byte configuration space with write and write-1-to-clear masks.

    ``get``/``set`` are the device's side and ignore the masks; ``read`` and
    ``write`` are the guest's and never raise: bytes past the end read 0xFF
    and writes to them are dropped.
    """

    def __init__(self) -> None:
        self.data = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self._last_cap: int | None = None
        self._next_cap = PCI_CAP_START
        self.set_wmask(PCI_COMMAND, 2, _COMMAND_WMASK)
        self.set_w1cmask(PCI_STATUS, 2, _STATUS_W1C)
        self.set_wmask(PCI_CACHE_LINE_SIZE, 1, 0xFF)
        self.set_wmask(PCI_LATENCY_TIMER, 1, 0xFF)
        self.set_wmask(PCI_INTERRUPT_LINE, 1, 0xFF)

    # --- device side -----------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        _check_range(offset, size)
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        _check_range(offset, size)
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def set_w1cmask(self, offset: int, size: int, mask: int) -> None:
        _check_range(offset, size)
        self.w1cmask[offset:offset + size] = mask.to_bytes(size, "little")

    def set_ids(self, vendor_id: int, device_id: int,
                subsystem_vendor_id: int = 0, subsystem_id: int = 0) -> None:
        self.set(PCI_VENDOR_ID, 2, vendor_id)
        self.set(PCI_DEVICE_ID, 2, device_id)
        self.set(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set(PCI_SUBSYSTEM_ID, 2, subsystem_id)

    def set_class(self, class_code: int, revision: int = 0) -> None:
        """``class_code`` is 24 bits: class << 16 | subclass << 8 | prog-if."""
        self.set(PCI_CLASS_PROG, 3, class_code)
        self.set(PCI_REVISION_ID, 1, revision)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (ID, next pointer, then ``body``) to the list.

        Capabilities are dword aligned from 0x40 and chained in the order
        added (§6.7).  ``wmask`` (same length as ``body``) makes bits of the
        body guest-writable.  Returns the capability's offset.
        """
        offset = (self._next_cap + 3) & ~3
        end = offset + 2 + len(body)
        if end > PCI_CONFIG_SPACE_SIZE:
            raise ValueError(f"capability {cap_id:#x} does not fit in config space")
        if wmask is not None and len(wmask) != len(body):
            raise ValueError("capability wmask must match the body length")
        self.data[offset:end] = bytes((cap_id & 0xFF, 0)) + body
        if wmask is not None:
            self.wmask[offset + 2:end] = wmask
        self._link_capability(offset)
        self._next_cap = end
        return offset

    def _link_capability(self, offset: int) -> None:
        if self._last_cap is None:
            self.data[PCI_CAPABILITY_LIST] = offset
            self.set(PCI_STATUS, 2, self.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        else:
            self.data[self._last_cap + 1] = offset
        self._last_cap = offset

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """(offset, cap ID) pairs, walking the list as a guest does (loop-safe)."""
        offset, seen = self.data[PCI_CAPABILITY_LIST] & ~3, set()
        while offset and offset not in seen:
            seen.add(offset)
            yield offset, self.data[offset]
            offset = self.data[offset + 1] & ~3

    # --- guest side ------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            reg = offset + i
            byte = self.data[reg] if 0 <= reg < PCI_CONFIG_SPACE_SIZE else 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            reg = offset + i
            if not 0 <= reg < PCI_CONFIG_SPACE_SIZE:
                continue
            byte, wm = (value >> (8 * i)) & 0xFF, self.wmask[reg]
            self.data[reg] = ((self.data[reg] & ~wm) | (byte & wm)) & ~(byte & self.w1cmask[reg])


def _check_range(offset: int, size: int) -> None:
    if offset < 0 or size < 1 or offset + size > PCI_CONFIG_SPACE_SIZE:
        raise ValueError(f"config range {offset:#x}+{size} is outside config space")


class PciDevice:
    """One PCI function: configuration space, BARs and where they decode.

    Subclasses override :meth:`bar_changed` to follow their BARs, and may
    override :meth:`config_read` / :meth:`config_write` (calling ``super()``)
    for registers with side effects.
    """

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *,
                 revision: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 header_type: int = 0, interrupt_pin: int = 0) -> None:
        self.config = PciConfig()
        self.config.set_ids(vendor_id, device_id, subsystem_vendor_id, subsystem_id)
        self.config.set_class(class_code, revision)
        self.config.set(PCI_HEADER_TYPE, 1, header_type)
        self.config.set(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        self.bars: dict[int, Bar] = {}
        self._mapped: dict[int, int | None] = {}
        self._power_on: tuple[bytes, bytes] | None = None

    # --- construction ------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: BarKind | str, prefetch: bool = False) -> Bar:
        """Declare BAR ``index`` (a 64-bit BAR also takes ``index + 1``)."""
        bar = Bar(index, size, BarKind(kind), prefetch)
        if bar.kind is BarKind.ROM or not 0 <= index <= PCI_NUM_BARS - bar.dwords:
            raise ValueError(f"BAR index {index} is not usable for a {bar.kind} BAR")
        if self._slot_taken(index) or (bar.dwords == 2 and self._slot_taken(index + 1)):
            raise ValueError(f"BAR {index} overlaps an existing BAR")
        return self._install_bar(bar)

    def add_rom_bar(self, size: int) -> Bar:
        """Declare the expansion ROM BAR (0x30); reported as index ``ROM_SLOT``."""
        if ROM_SLOT in self.bars:
            raise ValueError("ROM BAR already declared")
        return self._install_bar(Bar(ROM_SLOT, size, BarKind.ROM))

    def _slot_taken(self, index: int) -> bool:
        return any(b.index <= index < b.index + b.dwords
                   for b in self.bars.values() if b.kind is not BarKind.ROM)

    def _install_bar(self, bar: Bar) -> Bar:
        size_ok = bar.size & (bar.size - 1) == 0
        if not size_ok or not _MIN_SIZE[bar.kind] <= bar.size <= _MAX_SIZE[bar.kind]:
            raise ValueError(f"bad {bar.kind} BAR size {bar.size:#x}")
        wmask = bar.address_mask | (PCI_ROM_ADDRESS_ENABLE if bar.kind is BarKind.ROM else 0)
        nbytes = 4 * bar.dwords
        self.config.set(bar.offset, nbytes, bar.flags)
        self.config.set_wmask(bar.offset, nbytes, wmask)
        self.bars[bar.index] = bar
        self._mapped[bar.index] = None
        return bar

    # --- guest access --------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)
        self.sync_bars()

    def bar_changed(self, index: int, old: int | None, new: int | None) -> None:
        """BAR ``index`` now decodes at ``new`` (None: not at all) instead of ``old``."""

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` currently decodes (what bar_changed last reported)."""
        return self._mapped.get(index)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Mirror the INTx line in status bit 3 (§6.2.3)."""
        status = self.config.get(PCI_STATUS, 2) & ~PCI_STATUS_INTERRUPT
        self.config.set(PCI_STATUS, 2, status | (PCI_STATUS_INTERRUPT if asserted else 0))

    # --- decode tracking -------------------------------------------------------------

    def sync_bars(self) -> None:
        """Recompute every BAR's decode address; report the ones that changed."""
        for index in sorted(self.bars):
            old = self._mapped[index]
            new = self._decode_address(self.bars[index], old)
            if new != old:
                self._mapped[index] = new
                self.bar_changed(index, old, new)

    def _decode_address(self, bar: Bar, current: int | None) -> int | None:
        command = self.config.get(PCI_COMMAND, 2)
        decode = PCI_COMMAND_IO if bar.kind is BarKind.IO else PCI_COMMAND_MEMORY
        if not command & decode:
            return None
        if self._sizing(bar):
            return current  # all ones is a size probe, not a move
        raw = self.config.get(bar.offset, 4 * bar.dwords)
        if bar.kind is BarKind.ROM and not raw & PCI_ROM_ADDRESS_ENABLE:
            return None
        address = raw & bar.address_mask
        # Address 0 is "unassigned" (QEMU's pci_bar_address does the same).
        if address == 0 or address + bar.size > bar.limit:
            return None
        return address

    def _sizing(self, bar: Bar) -> bool:
        """True while any dword of the BAR has all its address bits set."""
        mask = bar.address_mask
        for i in range(bar.dwords):
            dword_mask = (mask >> (32 * i)) & 0xFFFFFFFF
            dword = self.config.get(bar.offset + 4 * i, 4)
            if dword_mask and dword & dword_mask == dword_mask:
                return True
        return False

    # --- reset -------------------------------------------------------------------------

    def capture_power_on_state(self) -> None:
        """Remember the current config space as what :meth:`reset` restores
        (PciBus.add calls this once the device is fully built)."""
        self._power_on = (bytes(self.config.data), bytes(self.config.wmask))

    def reset(self) -> None:
        """Back to power-on config (BARs unassigned, decode off)."""
        if self._power_on is not None:
            self.config.data[:] = self._power_on[0]
        else:
            for i, wm in enumerate(self.config.wmask):
                self.config.data[i] &= ~wm
        self.sync_bars()


# --- configuration mechanism #1 ------------------------------------------------------------


class ConfigAddress:
    """The CONFIG_ADDRESS latch at 0xCF8: dword accesses only (PCI 3.0
    §3.2.2.3.2); it reads back exactly what was written, which is how Linux
    and SeaBIOS detect mechanism #1 (write 0x80000000, read it back)."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.value
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.value = value & 0xFFFFFFFF

    def target(self) -> tuple[int, int, int, int] | None:
        """(bus, device, function, dword register offset), or None when disabled."""
        if not self.value & _CONFIG_ENABLE:
            return None
        v = self.value
        return (v >> 16) & 0xFF, (v >> 11) & 0x1F, (v >> 8) & 0x7, v & 0xFC


class ConfigData:
    """CONFIG_DATA at 0xCFC-0xCFF: any size at any of the four offsets."""

    def __init__(self, pci: PciBus, address: ConfigAddress) -> None:
        self._pci = pci
        self._address = address

    def read(self, offset: int, size: int) -> int:
        target, n = self._address.target(), _clamp(offset, size)
        if target is None or n <= 0:
            return (1 << (8 * size)) - 1
        bus, dev, fn, reg = target
        value = self._pci.config_read(bus, dev, fn, reg + offset, n)
        return value | (((1 << (8 * (size - n))) - 1) << (8 * n))

    def write(self, offset: int, size: int, value: int) -> None:
        target, n = self._address.target(), _clamp(offset, size)
        if target is not None and n > 0:
            bus, dev, fn, reg = target
            self._pci.config_write(bus, dev, fn, reg + offset, n, value & ((1 << (8 * n)) - 1))


def _clamp(offset: int, size: int) -> int:
    """How many bytes of an access at 0xCFC+offset fall inside 0xCFC-0xCFF."""
    return min(size, 4 - offset) if 0 <= offset < 4 else 0


class PciBus:
    """Bus 0: up to 32 single-function devices, reached through mechanism #1."""

    SLOTS = 32

    def __init__(self) -> None:
        self._devices: dict[int, PciDevice] = {}
        self.address = ConfigAddress()
        self.data = ConfigData(self, self.address)

    def add(self, slot: int, device: PciDevice) -> None:
        if not 0 <= slot < self.SLOTS or slot in self._devices:
            raise ValueError(f"PCI slot {slot} is invalid or taken")
        device.capture_power_on_state()
        self._devices[slot] = device

    def replace(self, slot: int, device: PciDevice) -> None:
        """Put ``device`` in the occupied ``slot`` (a placeholder's successor,
        see ``vhost_devices.PendingFunction``)."""
        if slot not in self._devices:
            raise ValueError(f"PCI slot {slot} is empty")
        device.capture_power_on_state()
        self._devices[slot] = device

    def get(self, slot: int) -> PciDevice | None:
        return self._devices.get(slot)

    def devices(self) -> Iterator[tuple[int, PciDevice]]:
        return iter(sorted(self._devices.items()))

    def _lookup(self, bus: int, slot: int, function: int) -> PciDevice | None:
        return self._devices.get(slot) if bus == 0 and function == 0 else None

    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> int:
        device = self._lookup(bus, slot, function)
        if device is None:
            return (1 << (8 * size)) - 1  # master abort: all ones
        return device.config_read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, size: int,
                     value: int) -> None:
        device = self._lookup(bus, slot, function)
        if device is not None:
            device.config_write(offset, size, value)

    def register(self, pio_bus: Bus) -> None:
        """0xCF8 (the dword latch; 0xCF9 is left to ResetControl) and 0xCFC-0xCFF."""
        pio_bus.register(PCI_CONFIG_ADDRESS_PORT, 1, self.address, "pci-config-address")
        pio_bus.register(PCI_CONFIG_DATA_PORT, 4, self.data, "pci-config-data")

    def reset(self) -> None:
        self.address.value = 0
        for _, device in self.devices():
            device.reset()


# --- chipset functions -----------------------------------------------------------------------

PCI_VENDOR_ID_INTEL = 0x8086
PCI_CLASS_BRIDGE_HOST = 0x060000
PCI_CLASS_BRIDGE_ISA = 0x060100

I440FX_PAM = 0x59        # PAM0..PAM6 at 0x59-0x5F (82441FX data sheet §3.2.18)
I440FX_PAM_COUNT = 7
I440FX_SMRAM = 0x72
_SMRAM_DEFAULT = 0x02    # C_BASE_SEG = 010: SMRAM at 0xA0000
_SMRAM_WMASK = 0x78      # D_OPEN, D_CLS, D_LCK, G_SMRAME


class I440fxHostBridge(PciDevice):
    """The i440FX host bridge at 00:00.0 (8086:1237, class 0600).

    SeaBIOS finds its 32-bit PCI window and INTx lines from it and unlocks
    and re-locks the BIOS shadow through the PAM registers
    (notes/seabios.md §1).  PAM registers are plain writable bytes here;
    ``on_pam_write(register, value)`` hears every change, should the machine
    want to change the memory map to match.
    """

    def __init__(self, on_pam_write: Callable[[int, int], None] | None = None) -> None:
        super().__init__(PCI_VENDOR_ID_INTEL, 0x1237, PCI_CLASS_BRIDGE_HOST, revision=0x02)
        self._on_pam_write = on_pam_write
        self.config.set_wmask(I440FX_PAM, I440FX_PAM_COUNT, (1 << (8 * I440FX_PAM_COUNT)) - 1)
        self.config.set(I440FX_SMRAM, 1, _SMRAM_DEFAULT)
        self.config.set_wmask(I440FX_SMRAM, 1, _SMRAM_WMASK)

    def pam(self) -> bytes:
        return bytes(self.config.data[I440FX_PAM:I440FX_PAM + I440FX_PAM_COUNT])

    def config_write(self, offset: int, size: int, value: int) -> None:
        before = self.pam()
        super().config_write(offset, size, value)
        self._notify_pam(before)

    def reset(self) -> None:
        before = self.pam()
        super().reset()
        self._notify_pam(before)

    def _notify_pam(self, before: bytes) -> None:
        _notify_changes(before, self.pam(), I440FX_PAM, self._on_pam_write)


PIIX3_PIRQ = 0x60        # PIRQRC[A:D] at 0x60-0x63 (82371SB data sheet §2.2.11)
PIIX3_PIRQ_COUNT = 4
PIRQ_DISABLED = 0x80
_PIRQ_WMASK = 0x8F       # IRQEN# and the IRQ number


class Piix3IsaBridge(PciDevice):
    """The PIIX3 PCI-to-ISA bridge, function 0 (8086:7000, class 0601), in slot 1.

    Only the PIRQ route control registers are modelled.  SeaBIOS programs
    them to IRQs 10, 10, 11, 11 (and the ELCR, which KVM's in-kernel PIC
    owns); ``on_pirq_write(pirq, value)`` hears every change.  The header
    says single-function: the PIIX3 IDE/USB functions do not exist here.
    """

    def __init__(self, on_pirq_write: Callable[[int, int], None] | None = None) -> None:
        super().__init__(PCI_VENDOR_ID_INTEL, 0x7000, PCI_CLASS_BRIDGE_ISA)
        self._on_pirq_write = on_pirq_write
        for i in range(PIIX3_PIRQ_COUNT):
            self.config.set(PIIX3_PIRQ + i, 1, PIRQ_DISABLED)
            self.config.set_wmask(PIIX3_PIRQ + i, 1, _PIRQ_WMASK)

    def pirq_irq(self, pirq: int) -> int | None:
        """The ISA IRQ PIRQ ``pirq`` (0 = A) is routed to, or None if disabled."""
        value = self.config.data[PIIX3_PIRQ + (pirq & 3)]
        return None if value & PIRQ_DISABLED else value & 0x0F

    def pirqs(self) -> bytes:
        return bytes(self.config.data[PIIX3_PIRQ:PIIX3_PIRQ + PIIX3_PIRQ_COUNT])

    def config_write(self, offset: int, size: int, value: int) -> None:
        before = self.pirqs()
        super().config_write(offset, size, value)
        _notify_changes(before, self.pirqs(), 0, self._on_pirq_write)

    def reset(self) -> None:
        before = self.pirqs()
        super().reset()
        _notify_changes(before, self.pirqs(), 0, self._on_pirq_write)


def _notify_changes(before: bytes, after: bytes, base: int,
                    callback: Callable[[int, int], None] | None) -> None:
    """Call ``callback(base + i, new)`` for every byte that changed."""
    if callback is None:
        return
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        if old != new:
            callback(base + i, new)


def pci_slot_pirq(slot: int, pin: int) -> int:
    """The PIRQ (0 = A) that INTx ``pin`` (1 = INTA) of a bus-0 ``slot`` drives.

    The i440FX/PIIX3 board swizzle, as in SeaBIOS pciinit.c
    (``piix_pci_slot_get_irq``) and QEMU's ``pci_slot_get_pirq``.
    """
    return (pin - 1 + slot - 1) & 3
