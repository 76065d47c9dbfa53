"""The KVM layer against the real /dev/kvm: tiny hand-assembled real-mode guests.

Each guest is a few bytes of 16-bit code (the listing is beside the bytes,
checked with GNU as + objdump) loaded at 0000:1000 in 1 MiB of memfd RAM
mapped as two slots with the PC's VGA hole (0xA0000-0xBFFFF) left unmapped
for MMIO.  The first part of the file needs no KVM: ABI numbers and layouts
pinned against shared/notes/kvm-and-linux-boot.md §1, CPUID normalisation,
routing tables.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from dvmm_core.kvm import (
    CpuidEntry,
    IrqchipRoute,
    Kvm,
    KvmError,
    KvmUnavailable,
    MsiRoute,
    Vcpu,
    VcpuRunner,
    Vm,
    kvm_available,
    probe_host,
)
from dvmm_core.kvm import ioctls as k
from dvmm_core.kvm.cpuid import find, normalize
from dvmm_core.machine.bus import Bus
from dvmm_shared.eventfd import EventFd
from dvmm_shared.memory import Region, memfd_region

RAM_SIZE = 1 << 20
VGA_HOLE = (0xA0000, 0xC0000)
CODE = 0x1000
WAIT = 20.0  # generous: CPL0 guest code is emulated at ~2 M instructions/s here

needs_kvm = pytest.mark.skipif(kvm_available() is not None,
                               reason=f"no usable KVM: {kvm_available()}")


# --- ABI: numbers and layouts (no KVM needed) ------------------------------------

NOTES_NUMBERS = {
    "KVM_GET_API_VERSION": 0xAE00, "KVM_CREATE_VM": 0xAE01, "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04, "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41, "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47, "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60, "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_IRQ_LINE_STATUS": 0xC008AE67, "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_IRQFD": 0x4020AE76, "KVM_CREATE_PIT2": 0x4040AE77, "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SIGNAL_MSI": 0x4020AEA5, "KVM_RUN": 0xAE80, "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82, "KVM_GET_SREGS": 0x8138AE83, "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88, "KVM_SET_MSRS": 0x4008AE89, "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D, "KVM_GET_LAPIC": 0x8400AE8E, "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90, "KVM_GET_CPUID2": 0xC008AE91,
}


@pytest.mark.parametrize("name", sorted(NOTES_NUMBERS))
def test_ioctl_numbers_match_the_notes(name: str) -> None:
    assert getattr(k, name) == NOTES_NUMBERS[name]
    assert getattr(k, name).name == name


def test_struct_layouts_match_the_notes() -> None:
    run = k.KvmRun
    assert ctypes.sizeof(run) == 2352
    assert (run.immediate_exit.offset, run.exit_reason.offset, run.if_flag.offset) == (1, 8, 13)
    assert (run.cr8.offset, run.apic_base.offset, run.exit.offset) == (16, 24, 32)
    io, mmio = k.KvmRunIo, k.KvmRunMmio
    assert (io.size.offset, io.port.offset, io.count.offset, io.data_offset.offset) == (
        1, 2, 4, 8)
    assert (mmio.data.offset, mmio.len.offset, mmio.is_write.offset) == (8, 16, 20)
    assert (k.KvmRegs.rsi.offset, k.KvmRegs.rip.offset, k.KvmRegs.rflags.offset) == (
        32, 128, 136)
    assert (k.KvmSregs.gdt.offset, k.KvmSregs.efer.offset,
            k.KvmSregs.interrupt_bitmap.offset) == (192, 264, 280)
    assert (k.KvmSegment.selector.offset, k.KvmSegment.type.offset) == (12, 14)
    assert (k.KvmFpu.fcw.offset, k.KvmFpu.xmm.offset, k.KvmFpu.mxcsr.offset) == (128, 152, 408)
    assert (k.KvmIoeventfd.fd.offset, k.KvmIoeventfd.flags.offset) == (20, 24)
    assert k.KvmIrqRoutingEntry.u.offset == 16 and ctypes.sizeof(k.KvmIrqRoutingEntry) == 48
    assert ctypes.sizeof(k.cpuid2_struct(3)) == 8 + 3 * 40
    assert ctypes.sizeof(k.msrs_struct(2)) == 8 + 2 * 16


def test_default_routes_follow_kvm() -> None:
    routes = Vm.default_routes()
    assert len(routes) == 16 * 2 + 8
    assert IrqchipRoute(4, k.KVM_IRQCHIP_PIC_MASTER, 4) in routes
    assert IrqchipRoute(12, k.KVM_IRQCHIP_PIC_SLAVE, 4) in routes
    assert IrqchipRoute(12, k.KVM_IRQCHIP_IOAPIC, 12) in routes
    assert [r for r in routes if r.gsi == 20] == [IrqchipRoute(20, k.KVM_IRQCHIP_IOAPIC, 20)]


def _host_like_cpuid() -> list[CpuidEntry]:
    return [CpuidEntry(0, 0, 0, 0x1C, 0, 0, 0),
            CpuidEntry(1, 0, 0, 0xA10F11, 0x01020800, 0x81202000, 0x078BFBFF),
            CpuidEntry(0xB, 0, 1, 0, 0, 0, 1),
            CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x7001, 0),
            CpuidEntry(0x8000001E, 0, 0, 0, 0, 0, 0)]


def test_cpuid_normalisation_per_vcpu() -> None:
    table = normalize(_host_like_cpuid(), 2, 4, tsc_deadline=True)
    leaf1 = find(table, 1)
    assert leaf1 is not None
    assert leaf1.ebx == 0x02040800  # APIC ID 2, 4 logical CPUs, CLFLUSH size kept
    assert leaf1.edx & (1 << 28) and leaf1.ecx & (1 << 31) and leaf1.ecx & (1 << 24)
    levels = [find(table, 0xB, i) for i in range(3)]
    assert [(e.ebx, (e.ecx >> 8) & 0xFF, e.edx) for e in levels if e] == [
        (1, 1, 2), (4, 2, 2), (0, 0, 2)]
    assert find(table, 0x8000001E) == CpuidEntry(0x8000001E, 0, 0, 2, 2, 0, 0)
    ext = find(table, 0x80000008)
    assert ext is not None and ext.ecx == 0x2003
    single = find(normalize(_host_like_cpuid(), 0, 1), 1)
    assert single is not None and single.ebx == 0x00010800 and not single.edx & (1 << 28)
    with pytest.raises(ValueError):
        normalize(_host_like_cpuid(), 4, 4)


def test_missing_device_is_a_clear_one_line_error() -> None:
    with pytest.raises(KvmUnavailable, match=r"^cannot open /nonexistent/kvm: No such file"):
        Kvm("/nonexistent/kvm")
    reason = kvm_available("/nonexistent/kvm")
    assert reason is not None and "\n" not in reason


# --- a tiny real-mode machine -----------------------------------------------------

class Recorder:
    """A bus device that logs every access and answers reads from a table."""

    def __init__(self, base: int, answers: dict[int, int] | None = None) -> None:
        self.base = base
        self.answers = answers or {}
        self.writes: list[tuple[int, int, int]] = []
        self.by_thread: dict[str, list[tuple[int, int]]] = {}
        self.cond = threading.Condition()

    def read(self, offset: int, size: int) -> int:
        return self.answers.get(self.base + offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.cond:
            self.writes.append((self.base + offset, size, value))
            name = threading.current_thread().name
            self.by_thread.setdefault(name, []).append((self.base + offset, value))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), f"guest never got there: {self.writes}"

    def wait_write(self, addr: int) -> int:
        def seen() -> bool:
            return any(a == addr for a, _, _ in self.writes)
        self.wait(seen)
        return next(v for a, _, v in self.writes if a == addr)


class Machine:
    """KVM VM + 1 MiB memfd RAM + port/MMIO buses + runners reporting to a queue."""

    def __init__(self, *, irqchip: bool = False, ncpus: int = 1) -> None:
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        if irqchip:
            self.vm.create_irqchip()
        self.mem_fd, self.ram = memfd_region(RAM_SIZE)
        self.vm.set_user_memory_region(0, 0, VGA_HOLE[0], self.ram.user_addr)
        self.vm.set_user_memory_region(1, VGA_HOLE[1], RAM_SIZE - VGA_HOLE[1],
                                       self.ram.user_addr + VGA_HOLE[1])
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.ports = Recorder(0x10)
        self.pio.register(0x10, 0x10, self.ports, "recorder")
        self.events: queue.Queue[tuple[str, str, int]] = queue.Queue()
        self.runners: list[VcpuRunner] = []
        supported = self.kvm.supported_cpuid()
        self.vcpus = [self.vm.create_vcpu(i) for i in range(ncpus)]
        for vcpu in self.vcpus:
            vcpu.setup_cpuid(supported, ncpus)
            real_mode_at(vcpu, CODE)

    def load(self, addr: int, code: bytes) -> None:
        self.ram.view[addr:addr + len(code)] = code

    def start(self, vcpu: Vcpu) -> VcpuRunner:
        def on_event(kind: str, detail: str) -> None:
            self.events.put((kind, detail, vcpu.index))
        runner = VcpuRunner(vcpu, self.pio, self.mmio, on_event)
        self.runners.append(runner)
        runner.start()
        return runner

    def next_event(self) -> tuple[str, str, int]:
        return self.events.get(timeout=WAIT)

    def close(self) -> None:
        for runner in self.runners:
            runner.stop()
        self.vm.close()
        self.kvm.close()
        os.close(self.mem_fd)


def real_mode_at(vcpu: Vcpu, ip: int) -> None:
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = ip, 0x8000, 0x2
    vcpu.set_regs(regs)


@pytest.fixture
def machine_factory() -> Iterator[Callable[..., Machine]]:
    made: list[Machine] = []

    def make(irqchip: bool = False, ncpus: int = 1) -> Machine:
        m = Machine(irqchip=irqchip, ncpus=ncpus)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def thread_state(runner: VcpuRunner) -> str:
    """The kernel's scheduler state letter of the runner's thread (R, S, ...)."""
    with open(f"/proc/self/task/{runner.native_id}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


# --- guests -------------------------------------------------------------------------

IO_GUEST = bytes.fromhex(
    "b042"            # mov al, 0x42
    "e610"            # out 0x10, al          -> port write 0x42
    "e411"            # in al, 0x11           <- the bus answers 0x5a
    "e612"            # out 0x12, al          -> echo
    "ba1400"          # mov dx, 0x14
    "66ed"            # in eax, dx            <- 4-byte read
    "ba1500"          # mov dx, 0x15
    "66ef"            # out dx, eax           -> echo, 4 bytes
    "b800a0"          # mov ax, 0xa000
    "8ee0"            # mov fs, ax
    "64c70610003412"  # mov word [fs:0x10], 0x1234  -> MMIO write at 0xa0010
    "6466a12000"      # mov eax, [fs:0x20]          <- MMIO read at 0xa0020
    "ba1600"          # mov dx, 0x16
    "66ef"            # out dx, eax           -> echo of the MMIO value
    "be0030"          # mov si, 0x3000
    "b90500"          # mov cx, 5
    "ba1800"          # mov dx, 0x18
    "f36e"            # rep outsb             -> 5 bytes from 0x3000
    "bf0031"          # mov di, 0x3100
    "b90400"          # mov cx, 4
    "ba1a00"          # mov dx, 0x1a
    "f36c"            # rep insb              <- 4 bytes to 0x3100
    "b007e61c"        # out 0x1c, 7           -> ioeventfd, no exit
    "b008e61d"        # out 0x1d, 8           -> ioeventfd datamatch 9: a normal exit
    "b0ffe61e"        # out 0x1e, 0xff        -> done
    "f4"              # hlt                   -> no irqchip: shutdown event
)


@needs_kvm
def test_port_mmio_string_io_and_ioeventfd(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory()
    m.ports.answers = {0x11: 0x5A, 0x14: 0xCAFEF00D, 0x1A: 0xA5}
    mmio = Recorder(0xA0000, {0xA0020: 0x12345678})
    m.mmio.register(0xA0000, 0x1000, mmio, "vga-hole")
    m.load(CODE, IO_GUEST)
    m.load(0x3000, b"hello")
    with EventFd() as kick, EventFd() as other:
        m.vm.ioeventfd(kick.fd, 0x1C, 1, pio=True)
        m.vm.ioeventfd(other.fd, 0x1D, 1, pio=True, datamatch=9)
        m.start(m.vcpus[0])
        kind, detail, _ = m.next_event()
        assert kind == "shutdown", detail
        assert kick.consume() == 1 and other.consume() == 0
    assert m.ports.writes == [
        (0x10, 1, 0x42), (0x12, 1, 0x5A), (0x15, 4, 0xCAFEF00D), (0x16, 4, 0x12345678),
        *((0x18, 1, c) for c in b"hello"), (0x1D, 1, 8), (0x1E, 1, 0xFF)]
    assert mmio.writes == [(0xA0010, 2, 0x1234)]
    assert bytes(m.ram.view[0x3100:0x3104]) == b"\xa5" * 4


IRQ_GUEST = bytes.fromhex(
    "e610"            # out 0x10, al   -> "ready"
    "fb"              # sti
    "f4"              # hlt            <- in-kernel irqchip: blocks in KVM, no exit
    "ebfd"            # jmp hlt
)
ISR_40 = bytes.fromhex("b040" "e611" "cf")  # out 0x11, 0x40; iret
ISR_50 = bytes.fromhex("b050" "e612" "cf")  # out 0x12, 0x50; iret
LAPIC_SVR = 0xF0
MSI_ADDR_APIC0 = 0xFEE00000


def install_ivt(ram: Region, vector: int, handler: int) -> None:
    ram.view[vector * 4:vector * 4 + 4] = handler.to_bytes(2, "little") + b"\0\0"


@needs_kvm
def test_irqfd_and_msi_reach_the_guest(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory(irqchip=True)
    vcpu = m.vcpus[0]
    vcpu.setup_boot_lapic()
    lapic = vcpu.get_lapic()
    lapic.set_reg(LAPIC_SVR, 0x1FF)  # software-enable the LAPIC
    vcpu.set_lapic(lapic)
    assert vcpu.get_lapic().get_reg(0x350) & 0x700 == 0x700  # LVT0 ExtINT
    m.load(CODE, IRQ_GUEST)
    m.load(0x2000, ISR_40)
    m.load(0x2010, ISR_50)
    install_ivt(m.ram, 0x40, 0x2000)
    install_ivt(m.ram, 0x50, 0x2010)
    m.vm.set_gsi_routing([*Vm.default_routes(), MsiRoute(24, MSI_ADDR_APIC0, 0, 0x40)])
    m.vm.irq_line(4, True)
    m.vm.irq_line(4, False)
    with EventFd() as call:
        m.vm.irqfd(call.fd, 24)
        runner = m.start(vcpu)
        m.ports.wait_write(0x10)
        call.signal()
        assert m.ports.wait_write(0x11) == 0x40
        m.vm.irqfd(call.fd, 24, deassign=True)
    assert m.vm.signal_msi(MSI_ADDR_APIC0, 0, 0x50) == 1
    assert m.ports.wait_write(0x12) == 0x50
    wait_until(lambda: thread_state(runner) == "S")  # halted inside KVM_RUN
    started = time.monotonic()
    runner.stop()
    assert not runner.running and time.monotonic() - started < 2
    assert m.events.empty()


CPUID_GUEST = bytes.fromhex(
    "66b801000000"    # mov eax, 1
    "0fa2"            # cpuid
    "66c1eb18"        # shr ebx, 24
    "88d8"            # mov al, bl
    "e610"            # out 0x10, al   -> initial APIC ID
    "66b80b000000"    # mov eax, 0xb
    "6631c9"          # xor ecx, ecx
    "0fa2"            # cpuid
    "88d0"            # mov al, dl
    "e611"            # out 0x11, al   -> x2APIC ID
    "f4"              # hlt
)


@needs_kvm
def test_two_vcpus_see_distinct_apic_ids(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory(ncpus=2)
    for vcpu in m.vcpus:
        leaf1 = find(vcpu.get_cpuid(), 1)
        assert leaf1 is not None
        assert leaf1.ebx >> 24 == vcpu.index and leaf1.edx & (1 << 28)
        assert (leaf1.ebx >> 16) & 0xFF == 2
    m.load(CODE, CPUID_GUEST)
    for vcpu in m.vcpus:
        m.start(vcpu)
    assert sorted(m.next_event()[0] for _ in m.vcpus) == ["shutdown", "shutdown"]
    assert m.ports.by_thread == {"vcpu0": [(0x10, 0), (0x11, 0)],
                                 "vcpu1": [(0x10, 1), (0x11, 1)]}


SPIN_GUEST = bytes.fromhex("e610" "ebfe")  # out 0x10, al; jmp $


@needs_kvm
def test_stop_interrupts_a_spinning_guest(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory()
    m.load(CODE, SPIN_GUEST)
    runner = m.start(m.vcpus[0])
    m.ports.wait_write(0x10)
    started = time.monotonic()
    runner.stop()
    assert not runner.running and time.monotonic() - started < 2
    assert m.events.empty() and not runner.is_current_thread
    # A stopped runner starts again where the guest was.
    rip = m.vcpus[0].get_regs().rip
    assert rip == CODE + 2
    runner.start()
    runner.stop()
    assert not runner.running


@needs_kvm
def test_stop_interrupts_an_ap_waiting_for_sipi(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory(irqchip=True, ncpus=2)
    ap = m.vcpus[1]
    assert ap.get_mp_state() == k.KVM_MP_STATE_UNINITIALIZED
    runner = m.start(ap)
    wait_until(lambda: thread_state(runner) == "S")
    started = time.monotonic()
    runner.stop()
    assert not runner.running and time.monotonic() - started < 2
    assert m.events.empty()


def flat_protected_mode(vcpu: Vcpu) -> None:
    """32-bit flat protected mode, no GDT in memory, IDT limit 0 (every fault fails)."""
    sregs = vcpu.get_sregs()
    for seg, sel, typ in ((sregs.cs, 8, 0xB), *((s, 0x10, 3) for s in (
            sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss))):
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, sel, typ
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
    sregs.cr0 |= 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    vcpu.set_sregs(sregs)


BSP_SIPI_GUEST = bytes.fromhex(  # 32-bit flat protected mode
    "c70510 03e0fe 00000001"   # mov dword [0xfee00310], 0x01000000  ICR high: APIC 1
    "c70500 03e0fe 00450000"   # mov dword [0xfee00300], 0x4500      INIT
    "c70500 03e0fe 02460000"   # mov dword [0xfee00300], 0x4602      SIPI, vector 2
    "e610"                     # out 0x10, al
    "fa" "f4" "ebfd"           # cli; hlt; jmp hlt
)
AP_GUEST = bytes.fromhex("b0aa" "e613" "f4")  # at 0200:0000: out 0x13, 0xaa; hlt


@needs_kvm
def test_an_ap_runs_after_init_and_sipi(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory(irqchip=True, ncpus=2)
    bsp, ap = m.vcpus
    for vcpu in m.vcpus:
        vcpu.setup_boot_lapic()
    m.load(CODE, BSP_SIPI_GUEST)
    m.load(0x2000, AP_GUEST)
    flat_protected_mode(bsp)
    ap_runner = m.start(ap)  # KVM_RUN returns EAGAIN until the SIPI: the runner retries
    wait_until(lambda: thread_state(ap_runner) == "S")
    m.start(bsp)
    assert m.ports.wait_write(0x13) == 0xAA
    m.ports.wait_write(0x10)
    assert m.ports.by_thread["vcpu1"] == [(0x13, 0xAA)]
    # vCPU ioctls wait for the vCPU's mutex, which KVM_RUN holds: stop first.
    for runner in m.runners:
        runner.stop()
    assert ap.get_mp_state() in (k.KVM_MP_STATE_HALTED, k.KVM_MP_STATE_RUNNABLE)
    assert m.events.empty()


@needs_kvm
def test_triple_fault_is_a_reset_event(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory()
    m.load(CODE, bytes.fromhex("0f0b"))  # ud2: #UD -> #GP (IDT limit) -> #DF -> shutdown
    flat_protected_mode(m.vcpus[0])
    m.start(m.vcpus[0])
    kind, detail, _ = m.next_event()
    assert kind == "reset", detail
    assert detail == "vCPU 0: triple fault at CS:RIP 0008:0x1000 (linear 0x1000)"


@needs_kvm
def test_an_unrunnable_guest_is_an_error_event(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory()
    # "int 0x10" with IDT limit 0 triple-faults on hardware; kvm_pvm's CPL0
    # emulator cannot emulate it and reports an internal error instead.
    m.load(CODE, bytes.fromhex("cd10"))
    flat_protected_mode(m.vcpus[0])
    m.start(m.vcpus[0])
    kind, detail, _ = m.next_event()
    assert "\n" not in detail and detail.startswith("vCPU 0: ")
    if kind == "error":
        assert "KVM internal error 1 (emulation failure) at CS:RIP 0008:0x1000" in detail
    else:
        assert kind == "reset", detail


@needs_kvm
def test_vm_ioctl_errors_name_the_ioctl(machine_factory: Callable[..., Machine]) -> None:
    m = machine_factory(irqchip=True)
    with pytest.raises(KvmError, match=r"^KVM_CREATE_IRQCHIP: File exists") as err:
        m.vm.create_irqchip()
    assert err.value.errno == 17
    with EventFd() as efd:
        m.vm.ioeventfd(efd.fd, 0xA0000, 2)
        with pytest.raises(KvmError, match="KVM_IOEVENTFD: File exists"):
            m.vm.ioeventfd(efd.fd, 0xA0000, 2)
        m.vm.ioeventfd(efd.fd, 0xA0000, 2, deassign=True)
    msrs = {0x174: 0, 0x175: 0, 0x176: 0, 0x1A0: 1}
    m.vcpus[0].set_msrs(msrs)
    assert m.vcpus[0].get_msrs(msrs) == msrs
    m.vcpus[0].set_fpu()
    assert m.vcpus[0].get_fpu().fcw == 0x37F


@needs_kvm
def test_probe_measures_this_host() -> None:
    started = time.monotonic()
    result = probe_host()
    assert time.monotonic() - started < 1.5
    assert result.kernel_mode_mips > 0 and "\n" not in result.reason
    assert result.kvm_pvm == os.path.isdir("/sys/module/kvm_pvm")
    if result.kvm_pvm:
        assert not result.hardware_speed
        assert "cannot boot" in result.reason
