"""The MC146818 CMOS/RTC at ports 0x70 (index) / 0x71 (data).

Owns the 128-byte CMOS array, the real-time clock registers (read from the
host clock, UTC, plus an offset the guest can move by writing the time) and
the memory/CPU/boot fields firmware reads.  The layout of those fields is
the one QEMU's hw/i386/pc.c (``pc_cmos_init``) writes and SeaBIOS reads
(src/fw/paravirt.c, src/boot.c).

Setting the clock follows the MC146818A: with SET (status B bit 7) on,
the time registers are frozen and take the guest's writes, and clearing SET
loads them (Linux's ``mc146818_set_time``); a time register written with SET
off takes effect at once.  The date is normalised as a calendar sum (Feb 30
becomes Mar 1), as QEMU's ``rtc_set_time`` does, so a transiently odd date
while fields are written one by one is harmless.

Not modelled: RTC interrupts (IRQ 8: periodic, alarm and update-ended), so
status C always reads 0; the update cycle, so UIP never shows.  Bit 7 of the
index (the NMI mask) is ignored.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import time
from collections.abc import Callable

from .bus import Bus
from .platform import ByteDevice, LogOnce

log = logging.getLogger("dvmm.cmos")

CMOS_PORT = 0x70
CMOS_SIZE = 128
_INDEX_MASK = 0x7F  # bit 7 of the index is the NMI mask

# RTC registers (MC146818A data sheet, "Address map").
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32  # IBM PC convention, read by SeaBIOS and Linux

REG_A_DEFAULT = 0x26      # 32.768 kHz time base, 1024 Hz rate; UIP clear
REG_A_UIP = 0x80
REG_B_SET = 0x80          # freeze the clock for setting
REG_B_24H = 0x02
REG_B_DM_BINARY = 0x04    # 0 = BCD
REG_D_VRT = 0x80          # valid RAM and time
HOUR_PM = 0x80            # in 12-hour mode

# PC CMOS fields (QEMU pc_cmos_init).
CMOS_SHUTDOWN_STATUS = 0x0F
CMOS_EQUIPMENT = 0x14
CMOS_BASE_MEM_LO = 0x15
CMOS_BASE_MEM_HI = 0x16
CMOS_EXT_MEM_LO = 0x17
CMOS_EXT_MEM_HI = 0x18
CMOS_EXT_MEM2_LO = 0x30
CMOS_EXT_MEM2_HI = 0x31
CMOS_MEM_ABOVE_16M_LO = 0x34
CMOS_MEM_ABOVE_16M_HI = 0x35
CMOS_BOOT_FLAG1 = 0x38    # bits 7:4 third boot device, bit 0 = skip floppy check
CMOS_BOOT_FLAG2 = 0x3D    # bits 7:4 second, 3:0 first boot device
CMOS_MEM_ABOVE_4G = 0x5B  # 0x5B-0x5D, 24 bits
CMOS_CPU_COUNT = 0x5F     # number of CPUs - 1

BOOT_HARD_DISK = 0x02
EQUIPMENT_FPU_MOUSE = 0x06

# The clock runs between 1970 and 9000: datetime cannot show year 10000.
_LATEST = calendar.timegm((9000, 1, 1, 0, 0, 0))

KiB = 1024
MiB = 1024 * KiB
_BASE_MEM_KIB = 640

_TIME_REGS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK,
              RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY)


def to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def from_bcd(value: int) -> int | None:
    hi, lo = value >> 4, value & 0x0F
    return None if hi > 9 or lo > 9 else hi * 10 + lo


def memory_fields(ram_below_4g: int, ram_above_4g: int, ncpus: int) -> dict[int, int]:
    """The CMOS bytes that describe RAM and CPUs, as QEMU's pc_cmos_init sets them."""
    ext_kib = min(max(ram_below_4g - MiB, 0) // KiB, 0xFFFF)
    above_16m = min(max(ram_below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
    above_4g = min(max(ram_above_4g, 0) // (64 * KiB), 0xFFFFFF)
    fields = {
        CMOS_BASE_MEM_LO: _BASE_MEM_KIB & 0xFF, CMOS_BASE_MEM_HI: _BASE_MEM_KIB >> 8,
        CMOS_EXT_MEM_LO: ext_kib & 0xFF, CMOS_EXT_MEM_HI: ext_kib >> 8,
        CMOS_EXT_MEM2_LO: ext_kib & 0xFF, CMOS_EXT_MEM2_HI: ext_kib >> 8,
        CMOS_MEM_ABOVE_16M_LO: above_16m & 0xFF, CMOS_MEM_ABOVE_16M_HI: above_16m >> 8,
        CMOS_CPU_COUNT: max(ncpus - 1, 0) & 0xFF,
        CMOS_BOOT_FLAG1: 0x00, CMOS_BOOT_FLAG2: BOOT_HARD_DISK,
        CMOS_EQUIPMENT: EQUIPMENT_FPU_MOUSE,
    }
    for i in range(3):
        fields[CMOS_MEM_ABOVE_4G + i] = (above_4g >> (8 * i)) & 0xFF
    return fields


class Cmos(ByteDevice):
    """CMOS RAM + RTC.  ``clock`` returns the host time in seconds (for tests)."""

    length = 2

    def __init__(self, ram_below_4g: int, ram_above_4g: int, ncpus: int,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._fields = memory_fields(ram_below_4g, ram_above_4g, ncpus)
        self._warn = LogOnce(log)
        self._offset = 0.0  # guest time minus host time, seconds
        self.index = 0
        self.ram = bytearray(CMOS_SIZE)
        self.reset()

    def reset(self) -> None:
        """Power-on contents.  The guest's clock offset survives, as a
        battery-backed RTC's time survives a reset."""
        self.ram[:] = bytes(CMOS_SIZE)
        self.ram[RTC_REG_A] = REG_A_DEFAULT
        self.ram[RTC_REG_B] = REG_B_24H
        self.ram[RTC_REG_D] = REG_D_VRT
        for reg, value in self._fields.items():
            self.ram[reg] = value
        self.index = 0

    def register(self, bus: Bus) -> None:
        bus.register(CMOS_PORT, self.length, self, "cmos")

    # --- ports ---------------------------------------------------------------

    def read_byte(self, offset: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        return self._read_reg(self.index)

    def write_byte(self, offset: int, value: int) -> None:
        if offset == 0:
            self.index = value & _INDEX_MASK
        else:
            self._write_reg(self.index, value)

    # --- registers -----------------------------------------------------------

    def _frozen(self) -> bool:
        return bool(self.ram[RTC_REG_B] & REG_B_SET)

    def _read_reg(self, reg: int) -> int:
        if reg in _TIME_REGS and not self._frozen():
            return self._encode_time(reg, self.now())
        if reg == RTC_REG_C:
            return 0  # no RTC interrupt is ever flagged
        return self.ram[reg]

    def _write_reg(self, reg: int, value: int) -> None:
        if reg in _TIME_REGS:
            self._write_time(reg, value)
        elif reg == RTC_REG_B:
            self._write_reg_b(value)
        elif reg == RTC_REG_A:
            self.ram[reg] = value & ~REG_A_UIP & 0xFF
        elif reg in (RTC_REG_C, RTC_REG_D):
            return  # read-only status
        else:
            self.ram[reg] = value

    # --- clock ---------------------------------------------------------------

    def now(self) -> datetime.datetime:
        """The guest's RTC time (UTC host clock + the guest's offset)."""
        seconds = min(max(int(self._clock() + self._offset), 0), _LATEST)
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)

    def _binary(self) -> bool:
        return bool(self.ram[RTC_REG_B] & REG_B_DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else to_bcd(value)

    def _decode(self, value: int) -> int | None:
        return value if self._binary() else from_bcd(value)

    def _encode_time(self, reg: int, t: datetime.datetime) -> int:
        if reg == RTC_HOURS:
            return self._encode_hour(t.hour)
        if reg == RTC_DAY_OF_WEEK:
            return self._encode(t.isoweekday() % 7 + 1)  # Sunday = 1
        values = {RTC_SECONDS: t.second, RTC_MINUTES: t.minute, RTC_DAY_OF_MONTH: t.day,
                  RTC_MONTH: t.month, RTC_YEAR: t.year % 100, RTC_CENTURY: t.year // 100}
        return self._encode(values[reg])

    def _encode_hour(self, hour: int) -> int:
        if self.ram[RTC_REG_B] & REG_B_24H:
            return self._encode(hour)
        pm = HOUR_PM if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int | None:
        if self.ram[RTC_REG_B] & REG_B_24H:
            return self._decode(value)
        hour12 = self._decode(value & ~HOUR_PM)
        if hour12 is None or not 1 <= hour12 <= 12:
            return None
        return hour12 % 12 + (12 if value & HOUR_PM else 0)

    def _freeze(self) -> None:
        """Copy the running time into the time registers."""
        t = self.now()
        for reg in _TIME_REGS:
            self.ram[reg] = self._encode_time(reg, t)

    def _write_reg_b(self, value: int) -> None:
        was_frozen = self._frozen()
        self.ram[RTC_REG_B] = value
        if self._frozen() and not was_frozen:
            self._freeze()
        elif was_frozen and not self._frozen():
            self._load_time()

    def _write_time(self, reg: int, value: int) -> None:
        if self._frozen():
            self.ram[reg] = value
            return
        self._freeze()
        self.ram[reg] = value
        self._load_time()

    def _load_time(self) -> None:
        """Run the clock from what the time registers say."""
        seconds = self._registers_time()
        if seconds is None or not 0 <= seconds <= _LATEST:
            self._warn.warn("time", "cmos: ignoring invalid RTC time %s",
                            bytes(self.ram[r] for r in _TIME_REGS).hex())
            return
        self._offset = seconds - self._clock()

    def _registers_time(self) -> int | None:
        """Seconds since the epoch the time registers describe, or None."""
        fields = [self._decode_hour(self.ram[r]) if r == RTC_HOURS else self._decode(self.ram[r])
                  for r in (RTC_CENTURY, RTC_YEAR, RTC_MONTH, RTC_DAY_OF_MONTH, RTC_HOURS,
                            RTC_MINUTES, RTC_SECONDS)]
        if any(f is None for f in fields):
            return None
        century, year, month, day, hour, minute, second = (f or 0 for f in fields)
        if not 1 <= month <= 12 or day < 1:
            return None
        try:  # timegm adds days/hours/... arithmetically: out-of-range days normalise
            return calendar.timegm((century * 100 + year, month, day, hour, minute, second))
        except (ValueError, OverflowError):
            return None
