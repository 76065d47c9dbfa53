"""What the machine looks like, in QEMU's QAPI shapes (read-only).

Owns turning the machine's parts into the answers of ``query-cpus-fast``
(qapi/machine.json CpuInfoFast), ``query-block`` (qapi/block-core.json
BlockInfo), ``query-pci`` (qapi/misc.json PciDeviceInfo) and the text of
``info registers`` (the layout of QEMU's ``x86_cpu_dump_state``).  Config
space is read from the functions' stored registers, never through an
access path with side effects; a PCI slot whose backend has not come up
yet is reported as such instead of being waited for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..machine.pci import (
    PCI_CLASS_PROG,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    BarKind,
    PciDevice,
)

if TYPE_CHECKING:
    from ..kvm.ioctls import KvmSegment
    from ..machine.pc import Machine


def cpu_info(machine: Machine) -> list[dict[str, Any]]:
    cpus = []
    for index, runner in enumerate(machine.runners):
        info: dict[str, Any] = {
            "cpu-index": index, "qom-path": f"/machine/unattached/device[{index}]",
            "props": {"socket-id": index, "core-id": 0, "thread-id": 0}, "target": "x86_64"}
        if runner.native_id is not None:
            info["thread-id"] = runner.native_id
        cpus.append(info)
    return cpus


def block_info(machine: Machine) -> list[dict[str, Any]]:
    disks = []
    for index, disk in enumerate(machine.cfg.disks):
        where = disk.image if disk.image is not None else disk.socket
        disks.append({
            "device": f"blk{index}", "qdev": f"/machine/peripheral-anon/blk{index}",
            "locked": False, "removable": False, "type": "unknown",
            "inserted": {"file": where, "ro": disk.read_only,
                         "drv": "raw" if disk.image is not None else "vhost-user-blk",
                         "node-name": f"blk{index}", "backing_file_depth": 0,
                         "encrypted": False, "detect_zeroes": "off", "bps": 0, "bps_rd": 0,
                         "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                         "write_threshold": 0, "cache": {"writeback": True, "direct": False,
                                                         "no-flush": False}}})
    return disks


def pci_info(machine: Machine) -> list[dict[str, Any]]:
    from ..machine.vhost_devices import PendingFunction

    devices = []
    for slot, device in machine.pci.devices():
        name = ""
        if isinstance(device, PendingFunction):
            name = device.device.name
            if device.device.function is None:
                devices.append(_pending(slot, name))
                continue
            device = device.device.function
        else:
            name = _device_name(machine, device)
        devices.append(_pci_device(slot, device, name))
    return devices


def _device_name(machine: Machine, device: PciDevice) -> str:
    for vhost in machine.devices:
        if vhost.function is device:
            return vhost.name
    return ""


def _pending(slot: int, name: str) -> dict[str, Any]:
    return {"bus": 0, "slot": slot, "function": 0, "class_info": {"class": 0xFF00,
                                                                  "desc": "(backend starting)"},
            "id": {"vendor": 0xFFFF, "device": 0xFFFF, "subsystem": 0,
                   "subsystem-vendor": 0}, "regions": [], "qdev_id": name}


def _pci_device(slot: int, device: PciDevice, name: str) -> dict[str, Any]:
    cfg = device.config
    pin = cfg.get(PCI_INTERRUPT_PIN, 1)
    info: dict[str, Any] = {
        "bus": 0, "slot": slot, "function": 0,
        "class_info": {"class": cfg.get(PCI_CLASS_PROG + 1, 2)},
        "id": {"vendor": cfg.get(PCI_VENDOR_ID, 2), "device": cfg.get(PCI_DEVICE_ID, 2),
               "subsystem": cfg.get(PCI_SUBSYSTEM_ID, 2),
               "subsystem-vendor": cfg.get(PCI_SUBSYSTEM_VENDOR_ID, 2)},
        "regions": [], "qdev_id": name}
    if pin:
        info["irq_pin"] = pin
        info["irq"] = cfg.get(PCI_INTERRUPT_LINE, 1)
    for index, bar in sorted(device.bars.items()):
        if bar.kind is BarKind.ROM:
            continue
        address = device.bar_address(index)
        region: dict[str, Any] = {"bar": index, "type": "io" if bar.kind is BarKind.IO
                                  else "memory", "address": -1 if address is None else address,
                                  "size": bar.size}
        if bar.kind is not BarKind.IO:
            region.update(prefetch=bar.prefetch, mem_type_64=bar.kind is BarKind.MEM64)
        info["regions"].append(region)
    return info


# -- info registers ------------------------------------------------------------------
def register_dump(machine: Machine, cpu: int | None) -> str:
    """(vCPUs out of KVM_RUN) The registers of one vCPU, or of all."""
    vcpus = machine.vcpus if cpu is None else [machine.vcpus[cpu]]
    return "".join(_one_cpu(v.index, v.get_regs(), v.get_sregs()) for v in vcpus)


def _one_cpu(index: int, regs: Any, sregs: Any) -> str:
    r = {n: getattr(regs, n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                                       "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                       "rip", "rflags")}
    lines = [f"CPU#{index}",
             *(" ".join(f"{name.upper()}={r[name]:016x}" for name in row)
               for row in (("rax", "rbx", "rcx", "rdx"), ("rsi", "rdi", "rbp", "rsp"),
                           ("r8", "r9", "r10", "r11"), ("r12", "r13", "r14", "r15"))),
             f"RIP={r['rip']:016x} RFL={r['rflags']:08x}"]
    for seg in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        lines.append(_segment(seg.upper(), getattr(sregs, seg)))
    for table in ("gdt", "idt"):
        t = getattr(sregs, table)
        lines.append(f"{table.upper()}=     {t.base:016x} {t.limit:08x}")
    lines.append(f"CR0={sregs.cr0:08x} CR2={sregs.cr2:016x} CR3={sregs.cr3:016x} "
                 f"CR4={sregs.cr4:08x}")
    lines.append(f"EFER={sregs.efer:016x} APIC_BASE={sregs.apic_base:016x}")
    return "\n".join(lines) + "\n"


def _segment(name: str, seg: KvmSegment) -> str:
    flags = (seg.type << 8) | (seg.s << 12) | (seg.dpl << 13) | (seg.present << 15) \
        | (seg.avl << 20) | (seg.l << 21) | (seg.db << 22) | (seg.g << 23)
    return f"{name:<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {flags:08x}"
