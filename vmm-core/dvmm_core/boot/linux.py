"""Direct Linux boot: the x86 boot protocol's 64-bit entry (Documentation/x86/boot.rst).

Owns reading a bzImage's setup header, and laying out what the kernel
expects at its 64-bit entry point: the protected-mode kernel at 1 MiB, the
zero page (boot_params, with a copy of the setup header and the e820 map),
the command line, the initrd at the top of low RAM, identity page tables
for the first GiB, a GDT, and the register state (RIP = load address +
0x200, RSI = zero page).  Pure: it returns :class:`LinuxBoot` (bytes to
place in guest memory and the CPU state) and touches no KVM.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..machine.e820 import E820Entry

HDRS_MAGIC = b"HdrS"
SETUP_HEADER_OFFSET = 0x1F1
KERNEL_LOAD_ADDR = 0x100000
ZERO_PAGE_ADDR = 0x7000
CMDLINE_ADDR = 0x20000
GDT_ADDR = 0x500
IDT_ADDR = 0x520
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
BOOT_STACK = 0x8FF0
E820_MAX = 128
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
MIN_PROTOCOL = 0x0206

GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
CODE_SEL, DATA_SEL, TSS_SEL = 0x08, 0x10, 0x18


class LinuxBootError(Exception):
    """The kernel image or its placement is unusable."""


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    xloadflags: int
    cmdline_size: int
    init_size: int
    raw: bytes  # header bytes 0x1F1 .. end of header
    pref_address: int = 0

    @classmethod
    def parse(cls, image: bytes) -> SetupHeader:
        if len(image) < 0x264 or image[0x202:0x206] != HDRS_MAGIC:
            raise LinuxBootError("not a bzImage (no 'HdrS' setup header)")
        version = struct.unpack_from("<H", image, 0x206)[0]
        if version < MIN_PROTOCOL:
            raise LinuxBootError(f"boot protocol {version:#x} is older than 2.06")
        setup_sects = image[0x1F1] or 4
        end = 0x202 + image[0x201]
        return cls(
            setup_sects=setup_sects, version=version, loadflags=image[0x211],
            initrd_addr_max=struct.unpack_from("<I", image, 0x22C)[0],
            kernel_alignment=struct.unpack_from("<I", image, 0x230)[0],
            xloadflags=struct.unpack_from("<H", image, 0x236)[0],
            cmdline_size=struct.unpack_from("<I", image, 0x238)[0],
            init_size=struct.unpack_from("<I", image, 0x260)[0],
            raw=image[SETUP_HEADER_OFFSET:end],
            pref_address=struct.unpack_from("<Q", image, 0x258)[0],
        )

    @property
    def kernel_offset(self) -> int:
        """Where the protected-mode kernel starts in the file."""
        return (self.setup_sects + 1) * 512

    @property
    def run_address(self) -> int:
        """Where the 64-bit entry moves the kernel before decompressing it: the
        load address rounded up to kernel_alignment, but no lower than
        LOAD_PHYSICAL_ADDR, which the header gives as pref_address
        (arch/x86/boot/compressed/head_64.S).  It then uses init_size from there."""
        align = max(self.kernel_alignment, 1)
        return max(-(-KERNEL_LOAD_ADDR // align) * align, self.pref_address)


@dataclass
class LinuxBoot:
    """Everything to write into guest memory, and the vCPU state to start in."""

    writes: list[tuple[int, bytes]] = field(default_factory=list)
    rip: int = 0
    rsi: int = ZERO_PAGE_ADDR
    rsp: int = BOOT_STACK
    gdt: tuple[int, int] = (GDT_ADDR, 8 * len(GDT) - 1)
    idt: tuple[int, int] = (IDT_ADDR, 7)
    cr3: int = PML4_ADDR
    code_selector: int = CODE_SEL
    data_selector: int = DATA_SEL
    tss_selector: int = TSS_SEL
    gdt_entries: tuple[int, ...] = GDT


def prepare(kernel: bytes, cmdline: str, e820: Sequence[E820Entry], low_ram_end: int,
            initrd: bytes | None = None) -> LinuxBoot:
    """Lay out a 64-bit direct boot of ``kernel`` (a bzImage)."""
    hdr = SetupHeader.parse(kernel)
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise LinuxBootError("kernel has no 64-bit entry point (xloadflags bit 0)")
    cmd = cmdline.encode() + b"\0"
    if len(cmd) > max(hdr.cmdline_size, 255) + 1:
        raise LinuxBootError(f"command line longer than the kernel's {hdr.cmdline_size} bytes")
    boot = LinuxBoot(rip=KERNEL_LOAD_ADDR + 0x200)
    body = kernel[hdr.kernel_offset:]
    # The loaded image, and the range the kernel decompresses itself into.
    kernel_end = max(KERNEL_LOAD_ADDR + len(body), hdr.run_address + hdr.init_size)
    if kernel_end > low_ram_end:
        raise LinuxBootError("not enough RAM below 4 GiB for the kernel")
    boot.writes.append((KERNEL_LOAD_ADDR, body))
    boot.writes.append((CMDLINE_ADDR, cmd))
    initrd_addr = 0
    if initrd:
        limit = min(low_ram_end, hdr.initrd_addr_max + 1)
        initrd_addr = (limit - len(initrd)) & ~0xFFF
        if initrd_addr < kernel_end:
            raise LinuxBootError("initrd does not fit in RAM above the kernel")
        boot.writes.append((initrd_addr, initrd))
    zero = zero_page(hdr, e820, initrd_addr, len(initrd or b""))
    boot.writes.append((ZERO_PAGE_ADDR, zero))
    boot.writes.append((GDT_ADDR, b"".join(struct.pack("<Q", d) for d in GDT)))
    boot.writes.append((IDT_ADDR, bytes(8)))
    boot.writes.extend(identity_page_tables())
    return boot


def zero_page(hdr: SetupHeader, e820: Sequence[E820Entry], initrd_addr: int,
              initrd_size: int) -> bytes:
    """struct boot_params (Documentation/x86/zero-page.rst)."""
    zp = bytearray(4096)
    zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(hdr.raw)] = hdr.raw
    zp[0x210] = 0xFF  # type_of_loader: undefined
    zp[0x211] = hdr.loadflags | CAN_USE_HEAP | LOADED_HIGH
    struct.pack_into("<H", zp, 0x224, 0xFE00)  # heap_end_ptr
    struct.pack_into("<I", zp, 0x228, CMDLINE_ADDR)
    struct.pack_into("<II", zp, 0x218, initrd_addr, initrd_size)
    if len(e820) > E820_MAX:
        raise LinuxBootError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX}")
    zp[0x1E8] = len(e820)
    for i, entry in enumerate(e820):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, entry.addr, entry.size, entry.kind)
    return bytes(zp)


def identity_page_tables() -> list[tuple[int, bytes]]:
    """PML4 -> PDPT -> PD mapping the first GiB with 2 MiB pages."""
    pml4 = struct.pack("<Q", PDPT_ADDR | 0x3).ljust(4096, b"\0")
    pdpt = struct.pack("<Q", PD_ADDR | 0x3).ljust(4096, b"\0")
    pd = b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512))
    return [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pd)]


# -- CPU state -----------------------------------------------------------------
CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
BOOT_MSRS = {
    0x174: 0, 0x175: 0, 0x176: 0,           # SYSENTER_CS/ESP/EIP
    0xC0000081: 0, 0xC0000082: 0, 0xC0000083: 0, 0xC0000084: 0,  # STAR LSTAR CSTAR SFMASK
    0xC0000102: 0,                          # KERNEL_GS_BASE
    0x10: 0,                                # TSC
    0x1A0: 1,                               # MISC_ENABLE: fast strings
    0x2FF: 0x806,                           # MTRRdefType: enabled, write-back
}


def _segment(seg: Any, descriptor: int, selector: int) -> None:
    """Fill a kvm_segment from a GDT descriptor (what the CPU would cache)."""
    seg.base = ((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 56) & 0xFF) << 24
    limit = (descriptor & 0xFFFF) | ((descriptor >> 48) & 0xF) << 16
    seg.g = (descriptor >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.selector = selector
    seg.type = (descriptor >> 40) & 0xF
    seg.s = (descriptor >> 44) & 1
    seg.dpl = (descriptor >> 45) & 3
    seg.present = (descriptor >> 47) & 1
    seg.avl = (descriptor >> 52) & 1
    seg.l = (descriptor >> 53) & 1
    seg.db = (descriptor >> 54) & 1
    seg.unusable = 0


def apply_cpu_state(vcpu: Any, boot: LinuxBoot) -> None:
    """Put the boot vCPU in 64-bit mode at the kernel's 64-bit entry point."""
    sregs = vcpu.get_sregs()
    gdt = boot.gdt_entries
    _segment(sregs.cs, gdt[boot.code_selector >> 3], boot.code_selector)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), gdt[boot.data_selector >> 3], boot.data_selector)
    _segment(sregs.tr, gdt[boot.tss_selector >> 3], boot.tss_selector)
    sregs.gdt.base, sregs.gdt.limit = boot.gdt
    sregs.idt.base, sregs.idt.limit = boot.idt
    sregs.cr3 = boot.cr3
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "r8", "r9", "r10", "r11"):
        setattr(regs, name, 0)
    regs.rip, regs.rsi, regs.rsp, regs.rbp, regs.rflags = (
        boot.rip, boot.rsi, boot.rsp, boot.rsp, 0x2)
    vcpu.set_regs(regs)
    vcpu.set_fpu()
    vcpu.set_msrs(BOOT_MSRS)
