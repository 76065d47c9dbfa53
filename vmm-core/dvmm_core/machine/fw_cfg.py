"""QEMU's firmware configuration device (fw_cfg), x86 port-I/O flavour.

Owns the items (numbered keys and named files), the selector/offset state,
the file directory and the DMA interface, per QEMU docs/specs/fw_cfg.rst
and notes/seabios.md §2.  It does not decide what the items say (e820 map,
CPU count, ACPI tables): the machine adds them.

Ports (relative offsets from 0x510 in brackets):

* 0x510 [0]: selector, 16-bit write.  Selecting resets the item offset.
* 0x511 [1]: data, byte reads advance through the item; past its end, or
  for a key with no item, reads are 0.  Writes are ignored (since QEMU 2.4).
* 0x514 [4]: DMA address, high 32 bits, big-endian.
* 0x518 [8]: DMA address, low 32 bits, big-endian; writing it runs the
  transfer.  Reads of 0x514-0x51B give the DMA signature "QEMU CFG".

A DMA descriptor in guest memory is ``{be32 control, be32 length, be64
address}``; the device writes control = 0 when done, or ERROR.  Guest
addresses are hostile: every access goes through ``GuestMemory.slice``,
whose ``GuestMemoryError`` becomes the ERROR bit.

Keys: a file's key is fixed when it is added (0x20, 0x21, ... in order of
addition), while the directory (key 0x19) lists files sorted by name as
QEMU does; firmware finds files by name, so the two orders need not agree.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import NamedTuple

from dvmm_shared.memory import GuestMemory, GuestMemoryError

from .bus import Bus
from .platform import LogOnce, PortWindow

log = logging.getLogger("dvmm.fw_cfg")

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_PORT_DMA_HI = 0x514
FW_CFG_PORT_DMA_LO = 0x518
_OFF_DATA = FW_CFG_PORT_DATA - FW_CFG_PORT_SEL
_OFF_DMA = FW_CFG_PORT_DMA_HI - FW_CFG_PORT_SEL
_OFF_DMA_LO = FW_CFG_PORT_DMA_LO - FW_CFG_PORT_SEL

FW_CFG_SIGNATURE_DATA = b"QEMU"
FW_CFG_DMA_SIGNATURE = b"QEMU CFG"


class FwCfgKey(IntEnum):
    """Selector keys, QEMU include/standard-headers/linux/qemu_fw_cfg.h."""

    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    MACHINE_ID = 0x06
    KERNEL_ADDR = 0x07
    KERNEL_SIZE = 0x08
    KERNEL_CMDLINE = 0x09
    INITRD_ADDR = 0x0A
    INITRD_SIZE = 0x0B
    BOOT_DEVICE = 0x0C
    NUMA = 0x0D
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    KERNEL_ENTRY = 0x10
    KERNEL_DATA = 0x11
    INITRD_DATA = 0x12
    CMDLINE_ADDR = 0x13
    CMDLINE_SIZE = 0x14
    CMDLINE_DATA = 0x15
    SETUP_ADDR = 0x16
    SETUP_SIZE = 0x17
    SETUP_DATA = 0x18
    FILE_DIR = 0x19
    FILE_FIRST = 0x20
    # x86 arch-local keys (QEMU hw/i386/fw_cfg.h)
    ACPI_TABLES = 0x8000
    SMBIOS_ENTRIES = 0x8001
    IRQ0_OVERRIDE = 0x8002
    E820_TABLE = 0x8003
    HPET = 0x8004


FW_CFG_WRITE_CHANNEL = 0x4000  # obsolete; ignored when selecting
FW_CFG_ARCH_LOCAL = 0x8000
_KEY_MASK = 0xFFFF & ~FW_CFG_WRITE_CHANNEL
_MAX_KEY = 0x3FFF  # within each of the generic and arch-local halves


class FwCfgId(IntFlag):
    """Key 0x01 feature bits."""

    TRADITIONAL = 0x01
    DMA = 0x02


class DmaControl(IntFlag):
    """FWCfgDmaAccess.control bits (fw_cfg.rst, "DMA interface")."""

    ERROR = 0x01
    READ = 0x02
    SKIP = 0x04
    SELECT = 0x08
    WRITE = 0x10


_DMA_DESC = struct.Struct(">IIQ")  # control, length, address
FILE_NAME_MAX = 56                 # including the terminating NUL
_FILE_ENTRY = struct.Struct(">IHH56s")
_ZERO_CHUNK = bytes(64 * 1024)


class _Item:
    __slots__ = ("data", "on_write", "writable")

    def __init__(self, data: bytearray, writable: bool = False,
                 on_write: Callable[[bytes], None] | None = None) -> None:
        self.data, self.writable, self.on_write = data, writable, on_write


class _Dma(NamedTuple):
    control: int
    length: int
    address: int


class FwCfg:
    """The fw_cfg device; ``mem`` is where DMA descriptors and buffers live."""

    def __init__(self, mem: GuestMemory, dma: bool = True) -> None:
        self._mem = mem
        self._items: dict[int, _Item] = {}
        self._files: dict[str, int] = {}
        self._warn = LogOnce(log)
        self._dma_enabled = dma
        self.selector = FwCfgKey.SIGNATURE.value
        self.offset = 0
        self._dma_high = 0
        features = FwCfgId.TRADITIONAL | (FwCfgId.DMA if dma else 0)
        self.add_item(FwCfgKey.SIGNATURE, FW_CFG_SIGNATURE_DATA)
        self.add_i32(FwCfgKey.ID, int(features))
        self._update_directory()

    # --- items ---------------------------------------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        """Set (or replace) the read-only item of ``key``."""
        _check_key(key)
        self._items[key] = _Item(bytearray(data))

    def add_i16(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<H", value & 0xFFFF))

    def add_i32(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<I", value & 0xFFFFFFFF))

    def add_i64(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))

    def add_file(self, name: str, data: bytes, writable: bool = False,
                 on_write: Callable[[bytes], None] | None = None) -> int:
        """Add (or replace) a named file; returns its key.

        A writable file accepts DMA writes that fit inside it; ``on_write``
        then gets the whole file contents.
        """
        encoded = name.encode()
        if not encoded or len(encoded) >= FILE_NAME_MAX or b"\0" in encoded:
            raise ValueError(f"fw_cfg file name {name!r} must be 1-55 bytes without NUL")
        key = self._files.get(name, FwCfgKey.FILE_FIRST + len(self._files))
        if key > _MAX_KEY:
            raise ValueError("fw_cfg: too many files")
        self._items[key] = _Item(bytearray(data), writable, on_write)
        self._files[name] = key
        self._update_directory()
        return key

    def file_data(self, name: str) -> bytes:
        """The current contents of a file (writable files may have changed)."""
        return bytes(self._items[self._files[name]].data)

    def _update_directory(self) -> None:
        entries = [_FILE_ENTRY.pack(len(self._items[key].data), key, 0, name.encode())
                   for name, key in sorted(self._files.items())]
        self._items[FwCfgKey.FILE_DIR] = _Item(
            bytearray(struct.pack(">I", len(entries)) + b"".join(entries)))

    # --- standard keys ---------------------------------------------------------

    def set_cpus(self, ncpus: int, max_cpus: int | None = None) -> None:
        """NB_CPUS and MAX_CPUS (le16); SeaBIOS waits for exactly this many APs."""
        self.add_i16(FwCfgKey.NB_CPUS, ncpus)
        self.add_i16(FwCfgKey.MAX_CPUS, ncpus if max_cpus is None else max_cpus)

    def set_ram_size(self, size: int) -> None:
        self.add_i64(FwCfgKey.RAM_SIZE, size)

    def set_nographic(self, nographic: bool) -> None:
        """1 makes SeaBIOS use COM1 as its console (notes/seabios.md §5)."""
        self.add_i16(FwCfgKey.NOGRAPHIC, int(nographic))

    def set_boot_menu(self, enabled: bool) -> None:
        """0 skips SeaBIOS's 2.5 s "Press ESC" wait."""
        self.add_i16(FwCfgKey.BOOT_MENU, int(enabled))

    # --- machine ---------------------------------------------------------------

    def register(self, bus: Bus) -> None:
        """Claim 0x510-0x511 and 0x514-0x51B (0x512-0x513 stay free)."""
        bus.register(FW_CFG_PORT_SEL, 2, PortWindow(self, 0), "fw_cfg")
        bus.register(FW_CFG_PORT_DMA_HI, 8, PortWindow(self, _OFF_DMA), "fw_cfg-dma")

    def reset(self) -> None:
        """QEMU's fw_cfg_reset: select the signature, forget a half-set DMA address."""
        self.select(FwCfgKey.SIGNATURE)
        self._dma_high = 0

    def select(self, key: int) -> None:
        self.selector = key & 0xFFFF
        self.offset = 0

    def _current(self) -> _Item | None:
        return self._items.get(self.selector & _KEY_MASK)

    # --- port access -------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """``offset`` is relative to 0x510."""
        if offset >= _OFF_DMA:
            start = offset - _OFF_DMA
            sig = FW_CFG_DMA_SIGNATURE[start:start + size] if self._dma_enabled else b""
            return int.from_bytes(sig.ljust(size, b"\xff"), "little")
        return int.from_bytes(self._read_data(size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < _OFF_DMA:
            if size == 2:  # QEMU's combined port: a 16-bit write selects
                self.select(value)
            return  # byte writes to the data port are ignored
        if size != 4 or not self._dma_enabled:
            self._warn.warn(("dma-size", size), "fw_cfg: ignoring %d-byte DMA port write", size)
        elif offset == _OFF_DMA:
            self._dma_high = _bswap32(value)
        elif offset == _OFF_DMA_LO:
            address, self._dma_high = (self._dma_high << 32) | _bswap32(value), 0
            self.dma_transfer(address)

    def _read_data(self, size: int) -> bytes:
        """``size`` bytes of the selected item, in item order, zero past its end."""
        item = self._current()
        data = b""
        if item is not None and self.offset < len(item.data):
            data = bytes(item.data[self.offset:self.offset + size])
        self.offset += len(data)
        return data.ljust(max(size, 0), b"\0")

    # --- DMA ---------------------------------------------------------------------

    def dma_transfer(self, desc_addr: int) -> None:
        """Run the descriptor at ``desc_addr`` (fw_cfg.rst "DMA interface")."""
        try:
            control, length, address = _DMA_DESC.unpack(self._mem.read(desc_addr, _DMA_DESC.size))
        except GuestMemoryError:
            self._warn.warn("dma-desc", "fw_cfg: DMA descriptor at %#x is not in guest memory",
                            desc_addr)
            return
        if control & DmaControl.SELECT:
            self.select(control >> 16)
        ok = self._run(_Dma(control, length, address))
        self._complete(desc_addr, 0 if ok else int(DmaControl.ERROR))

    def _run(self, dma: _Dma) -> bool:
        # READ wins over WRITE over SKIP; none of them means a zero length,
        # and a zero length succeeds without touching memory (as in QEMU).
        if dma.length == 0:
            return True
        if dma.control & DmaControl.READ:
            return self._dma_read(dma)
        if dma.control & DmaControl.WRITE:
            return self._dma_write(dma)
        if dma.control & DmaControl.SKIP:
            item = self._current()
            size = len(item.data) if item is not None else 0
            self.offset = min(self.offset + dma.length, max(size, self.offset))
        return True

    def _dma_read(self, dma: _Dma) -> bool:
        item = self._current()
        have = b""
        if item is not None and self.offset < len(item.data):
            have = bytes(item.data[self.offset:self.offset + dma.length])
        try:
            view = self._mem.slice(dma.address, dma.length)
        except GuestMemoryError:
            return self._bad_buffer(dma)
        view[:len(have)] = have
        _zero(view[len(have):])  # past the item's end the guest reads zeros
        self.offset += len(have)
        return True

    def _dma_write(self, dma: _Dma) -> bool:
        item = self._current()
        end = self.offset + dma.length
        if item is None or not item.writable or end > len(item.data):
            self._warn.warn(("dma-write", self.selector), "fw_cfg: refused DMA write to key "
                            "%#x", self.selector)
            return False
        try:
            item.data[self.offset:end] = self._mem.read(dma.address, dma.length)
        except GuestMemoryError:
            return self._bad_buffer(dma)
        self.offset = end
        if item.on_write is not None:
            item.on_write(bytes(item.data))
        return True

    def _bad_buffer(self, dma: _Dma) -> bool:
        self._warn.warn("dma-buf", "fw_cfg: DMA buffer %#x+%#x is not in guest memory",
                        dma.address, dma.length)
        return False

    def _complete(self, desc_addr: int, control: int) -> None:
        try:
            self._mem.write(desc_addr, struct.pack(">I", control))
        except GuestMemoryError:  # the descriptor was readable, so unlikely
            self._warn.warn("dma-done", "fw_cfg: cannot complete DMA at %#x", desc_addr)


def _check_key(key: int) -> None:
    if not 0 <= key <= 0xFFFF or key & FW_CFG_WRITE_CHANNEL:
        raise ValueError(f"fw_cfg key {key:#x} is not a valid item key")


def _bswap32(value: int) -> int:
    """The DMA ports are big-endian registers written with ``outl``."""
    return int.from_bytes((value & 0xFFFFFFFF).to_bytes(4, "little"), "big")


def _zero(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZERO_CHUNK)):
        chunk = view[start:start + len(_ZERO_CHUNK)]
        chunk[:] = _ZERO_CHUNK[:len(chunk)]
