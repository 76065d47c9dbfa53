"""Direct Linux boot (Documentation/arch/x86/boot.rst, zero-page.rst): the setup
header, the memory image ``prepare()`` lays out, and the 64-bit CPU state.

Most tests use a synthetic bzImage (a setup header and a body); the last
ones read the real Debian kernel when the guest cache has it.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from dvmm_core.boot.linux import (
    LinuxBoot,
    LinuxBootError,
    SetupHeader,
    apply_cpu_state,
    prepare,
)
from dvmm_core.guest import default_cache_dir
from dvmm_core.machine.e820 import E820_RAM, E820_RESERVED, E820Entry, RamLayout
from hypothesis import given, settings
from hypothesis import strategies as st

MIB = 1 << 20
KERNEL_AT, ZERO_PAGE, CMDLINE_AT = 0x100000, 0x7000, 0x20000
PML4, PDPT, PD, GDT_AT = 0x9000, 0xA000, 0xB000, 0x500
CAN_USE_HEAP, LOADED_HIGH = 0x80, 0x01
BODY = bytes(range(256)) * 64  # 16 KiB of "protected-mode kernel"
RAM_256M = 256 * MIB
# Header fields prepare() patches in the zero page's copy of the setup header.
PATCHED = {0x210, 0x211, *range(0x218, 0x220), *range(0x224, 0x226), *range(0x228, 0x22C)}


def bzimage(*, setup_sects: int = 4, version: int = 0x20F, xloadflags: int = 0x1,
            init_size: int = 0x800000, cmdline_size: int = 0x7FF,
            kernel_alignment: int = 0x200000, initrd_addr_max: int = 0x7FFFFFFF,
            pref_address: int = 0x1000000, loadflags: int = 0x01, magic: bytes = b"HdrS",
            body: bytes = BODY) -> bytes:
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"                      # boot_flag
    img[0x200:0x202] = b"\xeb\x6a"                      # jump: the header ends at 0x26C
    img[0x202:0x206] = magic
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = loadflags
    struct.pack_into("<I", img, 0x22C, initrd_addr_max)
    struct.pack_into("<I", img, 0x230, kernel_alignment)
    img[0x234] = 1                                      # relocatable_kernel
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, cmdline_size)
    struct.pack_into("<Q", img, 0x258, pref_address)
    struct.pack_into("<I", img, 0x260, init_size)
    return bytes(img) + body


def e820(low: int = RAM_256M) -> list[E820Entry]:
    return RamLayout(low).e820(firmware=False)


def written(boot: LinuxBoot) -> dict[int, bytes]:
    out = dict(boot.writes)
    assert len(out) == len(boot.writes), "two writes to the same address"
    return out


def assert_disjoint(boot: LinuxBoot, low_ram_end: int) -> None:
    spans = sorted((addr, addr + len(data)) for addr, data in boot.writes)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"writes overlap at {start:#x}"
    assert spans[-1][1] <= low_ram_end


# -- setup header ---------------------------------------------------------------------
def test_setup_header_fields() -> None:
    hdr = SetupHeader.parse(bzimage(setup_sects=7, init_size=0x1234000, cmdline_size=0x3FF))
    assert (hdr.setup_sects, hdr.version, hdr.xloadflags) == (7, 0x20F, 1)
    assert (hdr.init_size, hdr.cmdline_size, hdr.kernel_alignment) == (0x1234000, 0x3FF, 0x200000)
    assert hdr.initrd_addr_max == 0x7FFFFFFF
    assert hdr.kernel_offset == 8 * 512
    assert hdr.raw == bzimage(setup_sects=7, init_size=0x1234000,
                              cmdline_size=0x3FF)[0x1F1:0x26C]


def test_setup_sects_zero_means_four() -> None:
    img = bytearray(bzimage(setup_sects=4))
    img[0x1F1] = 0
    assert SetupHeader.parse(bytes(img)).kernel_offset == 5 * 512


@pytest.mark.parametrize("image,message", [
    (bzimage(magic=b"HdrT"), "HdrS"),
    (bzimage()[:0x263], "HdrS"),               # too short to hold the header
    (b"", "HdrS"),
    (bzimage(version=0x205), "older than 2.06"),
    (bzimage(version=0x100), "older than 2.06"),
])
def test_unusable_images_are_refused(image: bytes, message: str) -> None:
    with pytest.raises(LinuxBootError, match=message):
        prepare(image, "", e820(), RAM_256M)


# -- prepare(): the memory image -------------------------------------------------------------
def test_kernel_body_cmdline_and_entry_state() -> None:
    boot = prepare(bzimage(setup_sects=6), "console=ttyS0 panic=1", e820(), RAM_256M)
    w = written(boot)
    assert w[KERNEL_AT] == BODY
    assert w[CMDLINE_AT] == b"console=ttyS0 panic=1\0"
    assert boot.rip == KERNEL_AT + 0x200  # the 64-bit entry point
    assert boot.rsi == ZERO_PAGE
    assert boot.cr3 == PML4
    assert_disjoint(boot, RAM_256M)


def test_zero_page_fields() -> None:
    image = bzimage(loadflags=0x01)
    entries = e820()
    boot = prepare(image, "quiet", entries, RAM_256M, initrd=b"\x07" * 5000)
    zp = written(boot)[ZERO_PAGE]
    assert len(zp) == 4096
    for offset in range(0x1F1, 0x26C):  # the setup header copy
        if offset not in PATCHED:
            assert zp[offset] == image[offset], f"{offset:#x}"
    assert zp[0x202:0x206] == b"HdrS"
    assert zp[0x210] == 0xFF  # type_of_loader: undefined
    assert zp[0x211] & (CAN_USE_HEAP | LOADED_HIGH) == CAN_USE_HEAP | LOADED_HIGH
    assert struct.unpack_from("<I", zp, 0x228)[0] == CMDLINE_AT
    initrd_at, initrd_size = struct.unpack_from("<II", zp, 0x218)
    assert initrd_size == 5000 and written(boot)[initrd_at] == b"\x07" * 5000
    assert zp[0x1E8] == len(entries)
    for i, entry in enumerate(entries):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == (entry.addr, entry.size,
                                                                  entry.kind)
    assert zp[0x2D0 + 20 * len(entries):0x2D0 + 20 * 128] == bytes(20 * (128 - len(entries)))


def test_no_initrd_leaves_ramdisk_fields_zero() -> None:
    boot = prepare(bzimage(), "", e820(), RAM_256M)
    zp = written(boot)[ZERO_PAGE]
    assert struct.unpack_from("<II", zp, 0x218) == (0, 0)


@pytest.mark.parametrize("low,initrd_max,size", [
    (RAM_256M, 0x7FFFFFFF, 5000),
    (RAM_256M, 0x7FFFFFFF, 8 * MIB),
    (RAM_256M, 0x0BFFFFFF, 4096),     # initrd_addr_max below the end of RAM wins
    (RAM_256M - 0x1800, 0x7FFFFFFF, 3),  # RAM ending mid-page
    (3 << 30, 0x37FFFFFF, MIB + 1),
])
def test_initrd_is_page_aligned_at_the_top_of_usable_low_ram(low: int, initrd_max: int,
                                                             size: int) -> None:
    boot = prepare(bzimage(initrd_addr_max=initrd_max), "", e820(low), low,
                   initrd=b"\x01" * size)
    zp = written(boot)[ZERO_PAGE]
    addr = struct.unpack_from("<I", zp, 0x218)[0]
    limit = min(low, initrd_max + 1)
    assert addr % 4096 == 0
    assert addr + size <= limit
    assert limit - (addr + size) < 4096  # as high as alignment allows
    assert_disjoint(boot, low)


def test_identity_page_tables() -> None:
    w = written(prepare(bzimage(), "", e820(), RAM_256M))
    pml4, pdpt, pd = (w[a] for a in (PML4, PDPT, PD))
    assert len(pml4) == len(pdpt) == len(pd) == 4096
    assert struct.unpack_from("<Q", pml4)[0] == PDPT | 0x3
    assert pml4[8:] == bytes(4088)
    assert struct.unpack_from("<Q", pdpt)[0] == PD | 0x3
    assert pdpt[8:] == bytes(4088)
    entries = struct.unpack("<512Q", pd)
    assert entries == tuple((i << 21) | 0x83 for i in range(512))  # 1 GiB of 2 MiB pages


def test_gdt_and_idt() -> None:
    boot = prepare(bzimage(), "", e820(), RAM_256M)
    w = written(boot)
    gdt = struct.unpack("<4Q", w[GDT_AT])
    assert gdt == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
    assert boot.gdt == (GDT_AT, 31)
    assert w[0x520] == bytes(8) and boot.idt == (0x520, 7)
    assert (boot.code_selector, boot.data_selector, boot.tss_selector) == (0x08, 0x10, 0x18)


# -- prepare(): refusals ------------------------------------------------------------------
def test_no_64_bit_entry_is_refused() -> None:
    with pytest.raises(LinuxBootError, match="64-bit"):
        prepare(bzimage(xloadflags=0x2), "", e820(), RAM_256M)


def test_command_line_length_limit() -> None:
    image = bzimage(cmdline_size=0x7FF)
    boot = prepare(image, "x" * 0x7FF, e820(), RAM_256M)  # exactly cmdline_size: fits
    assert len(written(boot)[CMDLINE_AT]) == 0x800
    with pytest.raises(LinuxBootError, match="command line"):
        prepare(image, "x" * 0x800, e820(), RAM_256M)


def test_kernel_too_big_for_low_ram() -> None:
    image = bzimage(init_size=0x4000000)  # 64 MiB
    with pytest.raises(LinuxBootError, match="RAM"):
        prepare(image, "", e820(64 * MIB), 64 * MIB)
    with pytest.raises(LinuxBootError, match="RAM"):
        prepare(bzimage(body=bytes(2 * MIB), init_size=0, pref_address=0), "",
                e820(2 * MIB), 2 * MIB)


def test_kernel_that_decompresses_past_low_ram_is_refused() -> None:
    # The 64-bit entry moves the kernel up to pref_address (LOAD_PHYSICAL_ADDR,
    # 16 MiB) and uses init_size from there (head_64.S): 16 + 48 MiB > 60 MiB.
    image = bzimage(init_size=48 * MIB, pref_address=16 * MIB)
    with pytest.raises(LinuxBootError, match="RAM"):
        prepare(image, "", e820(60 * MIB), 60 * MIB)


def test_initrd_that_does_not_fit_is_refused() -> None:
    image = bzimage(init_size=32 * MIB)
    with pytest.raises(LinuxBootError, match="initrd"):
        prepare(image, "", e820(), RAM_256M, initrd=bytes(RAM_256M))
    with pytest.raises(LinuxBootError, match="initrd"):
        prepare(bzimage(initrd_addr_max=0xFFFFF), "", e820(), RAM_256M, initrd=b"x")


def test_initrd_never_overlaps_where_the_kernel_decompresses() -> None:
    # Kernel runs at 16 MiB with init_size 48 MiB: [16, 64) MiB is its own.
    # With 70 MiB of RAM a 10 MiB initrd would land at 60 MiB, inside it.
    image = bzimage(init_size=48 * MIB, pref_address=16 * MIB)
    with pytest.raises(LinuxBootError, match="initrd"):
        prepare(image, "", e820(70 * MIB), 70 * MIB, initrd=bytes(10 * MIB))
    boot = prepare(image, "", e820(80 * MIB), 80 * MIB, initrd=bytes(10 * MIB))
    addr = struct.unpack_from("<I", written(boot)[ZERO_PAGE], 0x218)[0]
    assert addr >= 64 * MIB


def test_too_many_e820_entries_are_refused() -> None:
    many = [E820Entry(i * 0x1000, 0x1000, E820_RAM) for i in range(129)]
    with pytest.raises(LinuxBootError, match="e820"):
        prepare(bzimage(), "", many, RAM_256M)


@settings(max_examples=60, deadline=None)
@given(low_mib=st.integers(80, 3072), initrd_kib=st.integers(0, 16 * 1024),
       init_mib=st.integers(1, 64), cmdline=st.text(st.characters(min_codepoint=32,
                                                                     max_codepoint=126),
                                                       max_size=300))
def test_prepare_output_never_overlaps(low_mib: int, initrd_kib: int, init_mib: int,
                                       cmdline: str) -> None:
    low = low_mib * MIB
    image = bzimage(init_size=init_mib * MIB)
    initrd = b"\x5a" * (initrd_kib * 1024) or None
    try:
        boot = prepare(image, cmdline, e820(min(low, 3 << 30)), low, initrd)
    except LinuxBootError:
        assert initrd is not None  # only the initrd can fail to fit in these ranges
        return
    assert_disjoint(boot, low)
    if initrd:
        addr = struct.unpack_from("<I", written(boot)[ZERO_PAGE], 0x218)[0]
        assert addr >= 16 * MIB + init_mib * MIB  # above the running kernel


# -- CPU state ----------------------------------------------------------------------------------
def _seg() -> SimpleNamespace:
    return SimpleNamespace(base=0, limit=0, g=0, selector=0, type=0, s=0, dpl=0, present=0,
                           avl=0, l=0, db=0, unusable=1)


class FakeVcpu:
    def __init__(self) -> None:
        self.sregs = SimpleNamespace(
            cs=_seg(), ds=_seg(), es=_seg(), fs=_seg(), gs=_seg(), ss=_seg(), tr=_seg(),
            gdt=SimpleNamespace(base=0, limit=0), idt=SimpleNamespace(base=0, limit=0),
            cr0=0x60000010, cr3=0, cr4=0, efer=0)
        self.regs = SimpleNamespace()
        self.msrs: dict[int, int] = {}

    def get_sregs(self) -> Any:
        return self.sregs

    def set_sregs(self, sregs: Any) -> None:
        self.sregs = sregs

    def get_regs(self) -> Any:
        return self.regs

    def set_regs(self, regs: Any) -> None:
        self.regs = regs

    def set_fpu(self) -> None:
        pass

    def set_msrs(self, msrs: dict[int, int]) -> None:
        self.msrs = dict(msrs)


def test_cpu_state_is_64_bit_long_mode_at_the_entry() -> None:
    boot = prepare(bzimage(), "", e820(), RAM_256M)
    vcpu = FakeVcpu()
    apply_cpu_state(vcpu, boot)
    s = vcpu.sregs
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.present) == (0x08, 1, 0, 0xB, 1)
    assert (s.cs.base, s.cs.limit, s.cs.g, s.cs.s) == (0, 0xFFFFFFFF, 1, 1)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert (seg.selector, seg.type, seg.db, seg.l, seg.unusable) == (0x10, 0x3, 1, 0, 0)
    assert (s.tr.selector, s.tr.type, s.tr.s) == (0x18, 0xB, 0)
    assert (s.gdt.base, s.gdt.limit) == (GDT_AT, 31)
    assert s.cr3 == PML4
    assert s.cr0 & 0x80000001 == 0x80000001  # PG | PE
    assert s.cr4 & 0x20  # PAE
    assert s.efer & 0x500 == 0x500  # LME | LMA
    r = vcpu.regs
    assert (r.rip, r.rsi, r.rsp, r.rbp, r.rflags) == (0x100200, ZERO_PAGE, 0x8FF0, 0x8FF0, 2)
    assert vcpu.msrs[0x2FF] == 0x806


# -- the real Debian kernel -----------------------------------------------------------------------
def _cached(pattern: str) -> list[Path]:
    return sorted(default_cache_dir().glob(pattern))


REAL_KERNELS = _cached("*/vmlinuz")
needs_kernel = pytest.mark.skipif(not REAL_KERNELS, reason="guest kernel not cached "
                                  "(python -m dvmm_core.guest build)")


@needs_kernel
def test_real_kernel_setup_header() -> None:
    hdr = SetupHeader.parse(REAL_KERNELS[0].read_bytes())
    assert hdr.version == 0x20F
    assert hdr.xloadflags & 1
    assert hdr.kernel_alignment == 0x200000
    assert hdr.cmdline_size == 0x7FF
    assert hdr.init_size > 16 * MIB


@needs_kernel
def test_real_kernel_prepare() -> None:
    kernel = REAL_KERNELS[0].read_bytes()
    initrds = sorted(REAL_KERNELS[0].parent.glob("initrd-*.cpio.gz"))
    initrd = initrds[0].read_bytes() if initrds else b"\0" * MIB
    low = 512 * MIB
    boot = prepare(kernel, "console=ttyS0 reboot=k panic=1 pci=conf1", e820(low), low, initrd)
    assert_disjoint(boot, low)
    hdr = SetupHeader.parse(kernel)
    w = written(boot)
    assert w[KERNEL_AT] == kernel[hdr.kernel_offset:]
    zp = w[ZERO_PAGE]
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x206)[0] == 0x20F
    assert struct.unpack_from("<I", zp, 0x21C)[0] == len(initrd)


@needs_kernel
def test_real_kernel_initrd_is_kept_clear_of_the_decompressed_kernel() -> None:
    kernel = REAL_KERNELS[0].read_bytes()
    hdr = SetupHeader.parse(kernel)
    # RAM that holds the running kernel ([16 MiB, 16 MiB + init_size)) but
    # only with 1 MiB to spare: a 2 MiB initrd cannot go anywhere safe.
    low = (16 * MIB + hdr.init_size + MIB) & ~(MIB - 1)
    with pytest.raises(LinuxBootError, match="initrd"):
        prepare(kernel, "", e820(low), low, bytes(2 * MIB))


def test_layout_e820_kinds_are_what_zero_page_expects() -> None:
    kinds = {e.kind for e in e820()}
    assert kinds == {E820_RAM, E820_RESERVED}
