"""The PC machine: guest RAM, KVM, platform devices, PCI, backends, lifecycle.

Owns putting the parts together and the machine's lifecycle:

* guest RAM is one memfd mapped once in the core; the low part (below the
  PCI hole) and the high part (from 4 GiB) become KVM slots, vhost-user
  memory-table regions and e820 entries from the same :class:`RamLayout`;
* a *VM instance* (KVM VM, irqchip, PIT, memory slots, vCPUs) is created at
  start and created again on every guest reset, while RAM, device models and
  backend processes live on;
* events from vCPUs (reset, shutdown, crash) and from the supervisor
  (backend exited) arrive on one queue that :meth:`Machine.run` serves;
* backends are restarted by the supervisor (their restart policy) and their
  links reconnect on their own; what happens is published on the control
  plane (:class:`CoreControl`), which also answers ``dvmm status|fault``.

Start-up order (:meth:`Machine.start`, issue 9): spawn the backends, create
the VM instance, start the vCPUs -- the first guest instruction -- and only
then connect the backends (``vhost_devices``: a device's first access waits
for its backend) and open the control plane (its events wait in a buffer
until then).  Nothing the first instruction does not need is imported
before it: the vhost-user stack, the virtio-pci transport, ZeroMQ and
psutil are imported on first use.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dvmm_shared.memory import GuestMemory, Region, RegionSpec, buffer_address

from ..core_control import CoreControl
from ..kvm import Kvm, Vcpu, VcpuRunner, Vm
from ..supervisor import Backend, RestartPolicy, RestartSpec, Supervisor
from .bus import Bus
from .cmos import Cmos
from .e820 import KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, RamLayout
from .fw_cfg import FwCfg
from .i8042 import I8042, parse_input_events
from .intx import IntxPump
from .irq import IrqRouter
from .pci import I440fxHostBridge, PciBus, Piix3IsaBridge
from .platform import DebugCon, FastA20, PostCode, ResetControl
from .serial import Serial
from .vhost_devices import PendingFunction, VhostDevice

if TYPE_CHECKING:  # imported where used: not every machine has these (start-up cost)
    from ..runners import Runner
    from ..vhost_user_frontend import RamRegion, VhostUserLink
    from ..virtio_pci.device import VirtioPciDevice
    from .display import DisplayLink, DisplaySpec
    from .ramfb import Ramfb

log = logging.getLogger("dvmm.machine")

FOUR_GIB = 1 << 32
BIOS_LOW_WINDOW = 128 * 1024
SLOT_LOW, SLOT_HIGH, SLOT_BIOS = 0, 1, 2
COM1_GSI = 4
FIRST_PCI_SLOT = 2
NET_CONFIG_SIZE = 12  # mac, status, max_virtqueue_pairs, mtu (virtio 1.2 5.1.4)
PXE_VIRTIO_ROM = "/usr/lib/ipxe/qemu/pxe-virtio.rom"
BLK_CONFIG_SIZE = 60  # struct virtio_blk_config up to write_zeroes_may_unmap + pad
GPU_CONFIG_SIZE = 16  # events_read, events_clear, num_scanouts, num_capsets (virtio 1.2 5.7.4)


class MachineError(Exception):
    """A configuration or resource problem (reported as one line)."""


@dataclass
class DiskSpec:
    """A virtio-blk disk: an image for a spawned dvmm backend, or a socket."""

    image: str | None = None
    socket: str | None = None
    read_only: bool = False
    restart: RestartPolicy | None = None  # None: the machine's policy
    runner: str | None = None  # process|bwrap|docker; None: the machine's


@dataclass
class NetSpec:
    """A virtio-net NIC: a dvmm net backend on a TAP or a VM-to-VM peer link,
    or an external vhost-user-net socket."""

    tap: str | None = None
    peer: str | None = None
    socket: str | None = None
    mac: str | None = None
    queues: int = 1
    restart: RestartPolicy | None = None
    runner: str | None = None


def add_boot_menu_key(fw: FwCfg, key: str) -> None:
    """The key that opens SeaBIOS's boot menu (int 16h scan code, SeaBIOS
    src/boot.c interactive_bootmenu), with its prompt; ESC is the default."""
    if key != "esc":
        scan = {"f12": 0x86}[key]
        fw.add_file("etc/boot-menu-key", scan.to_bytes(2, "little"))
        fw.add_file("etc/boot-menu-message", f"\nPress {key.upper()} for boot menu.\n\n".encode())


def default_mac(index: int) -> str:
    return f"52:54:00:12:34:{0x56 + index:02x}"


@dataclass
class MachineConfig:
    memory: int = 256 << 20
    cpus: int = 1
    firmware: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = "console=ttyS0 reboot=k panic=1 pci=conf1"
    disks: list[DiskSpec] = field(default_factory=list)
    nets: list[NetSpec] = field(default_factory=list)
    net_rom: str | None = PXE_VIRTIO_ROM
    serial_sink: Callable[[bytes], None] = lambda data: None
    firmware_log: Callable[[bytes], None] | None = None
    hugepages: bool = False
    backend_args: list[str] = field(default_factory=list)
    kvm_path: str = "/dev/kvm"
    restart: RestartSpec = field(default_factory=RestartSpec)
    standby: bool = True  # a warm twin per backend for fast restarts
    runner: str = "process"  # how backends are started (``runners``): process|bwrap|docker
    display: DisplaySpec | None = None  # a display process, ramfb and a PS/2 keyboard
    boot_menu: int | None = None  # SeaBIOS's boot menu, waiting this many ms for a key
    boot_menu_key: str = "esc"  # or "f12" (SeaBIOS before 1.12 used F12)


class GuestRam:
    """The memfd and its single mapping, cut into the layout's regions."""

    def __init__(self, layout: RamLayout, hugepages: bool) -> None:
        self.layout = layout
        if hugepages:
            check_hugepages(layout.total)
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugepages else 0)
        self.fd = os.memfd_create("dvmm-ram", flags)
        try:
            os.ftruncate(self.fd, layout.total)
            whole = Region.map(RegionSpec(0, layout.total, 0, 0, self.fd))
        except OSError as exc:
            os.close(self.fd)
            raise MachineError(_ram_error(layout.total, hugepages, exc)) from None
        self._whole = whole
        self.host_base = buffer_address(whole.view)
        self.regions = [Region(c.guest_addr, c.size, self.host_base + c.fd_offset, c.fd_offset,
                               whole.view[c.fd_offset:c.fd_offset + c.size], whole._mapping)
                        for c in layout.chunks]
        self.mem = GuestMemory(self.regions)

    def ram_regions(self) -> list[RamRegion]:
        from ..vhost_user_frontend import RamRegion

        return [RamRegion(r.guest_addr, r.size, r.user_addr, self.fd, r.mmap_offset)
                for r in self.regions]


def check_hugepages(size: int, meminfo: str = "/proc/meminfo") -> None:
    """Refuse up front what would otherwise be a SIGBUS on the first touch of
    a hugetlb page nobody reserved."""
    fields: dict[str, int] = {}
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) if rest.split() else 0
    except (OSError, ValueError) as exc:
        raise MachineError(f"cannot read {meminfo}: {exc}") from None
    page = fields.get("Hugepagesize", 0) * 1024
    free = fields.get("HugePages_Free", 0) * page
    if page == 0 or size % page:
        raise MachineError(f"guest RAM of {size >> 20} MiB is not a multiple of the "
                           f"{page >> 10} KiB hugepage size")
    if free < size:
        raise MachineError(
            f"--hugepages needs {size // page} free hugepages of {page >> 10} KiB, the host has "
            f"{free // page} (reserve them in /proc/sys/vm/nr_hugepages)")


def _ram_error(size: int, hugepages: bool, exc: OSError) -> str:
    if hugepages:
        return (f"cannot allocate {size >> 20} MiB of hugepage-backed RAM ({exc.strerror}); "
                "reserve hugepages first (/proc/sys/vm/nr_hugepages)")
    return f"cannot allocate {size >> 20} MiB of guest RAM: {exc.strerror}"


class Machine:
    """One virtual PC."""

    def __init__(self, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()
        self.kvm = Kvm(cfg.kvm_path)
        self.layout = RamLayout(cfg.memory)
        self.ram = GuestRam(self.layout, cfg.hugepages)
        solo = cfg.cpus == 1  # one vCPU thread: unserialised buses (see machine.bus)
        self.pio, self.mmio = Bus("pio", serialize=not solo), Bus("mmio", serialize=not solo)
        self.bios = self._load_firmware(cfg.firmware) if cfg.firmware else None
        self.router = IrqRouter(None)
        self.pump = IntxPump()
        self.supervisor = Supervisor(on_exit=self._backend_exited, on_event=self.publish)
        self.links: dict[str, VhostUserLink] = {}
        self.devices: list[VhostDevice] = []
        self.state = "starting"
        self.failure = ""  # the detail of the event that ended run()
        self.control = CoreControl(self.supervisor, lambda: list(self.links.values()),
                                   lambda: self.state)
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.runners: list[VcpuRunner] = []
        self.pci = PciBus()
        self._roms: set[str] = set()
        self._build_platform()
        self.fw_cfg = self._build_fw_cfg()
        self.resets = 0
        #: Set (on the main thread) while QMP ``stop`` holds the vCPUs.
        self.paused = False
        self.display: DisplayLink | None = None
        self.ramfb: Ramfb | None = None
        self.control.input = self.input_events

    @property
    def virtio(self) -> list[VirtioPciDevice]:
        """The virtio-pci functions whose backends are up (see ``vhost_devices``)."""
        return [d.function for d in self.devices if d.function is not None]

    # -- construction ---------------------------------------------------------
    def _build_platform(self) -> None:
        self.serial = Serial(self.cfg.serial_sink, lambda level: self._irq(COM1_GSI, level))
        self.serial.register(self.pio)
        below = self.layout.low_size
        self.cmos = Cmos(below, self.layout.high_size, self.cfg.cpus)
        self.cmos.register(self.pio)
        self.i8042 = I8042(self._guest_reset, self._irq, present=self.cfg.display is not None)
        self.i8042.register(self.pio)
        FastA20(self._guest_reset).register(self.pio)
        ResetControl(self._guest_reset).register(self.pio)
        if self.cfg.firmware_log is not None:
            # Only with a log to write: an unclaimed 0x402 reads 0xFF and
            # SeaBIOS then skips formatting its debug messages, which costs
            # real time when firmware code runs in kvm_pvm's emulator.
            DebugCon(self.cfg.firmware_log).register(self.pio)
        PostCode().register(self.pio)
        self.pci.add(0, I440fxHostBridge())
        self.pci.add(1, Piix3IsaBridge())
        self.pci.register(self.pio)

    def _build_fw_cfg(self) -> FwCfg:
        fw = FwCfg(self.ram.mem)
        fw.set_cpus(self.cfg.cpus)
        fw.set_ram_size(self.cfg.memory)
        fw.set_nographic(True)
        fw.set_boot_menu(self.cfg.boot_menu is not None)
        if self.cfg.boot_menu is not None:  # SeaBIOS romfile_loadint: any LE size
            fw.add_file("etc/boot-menu-wait", self.cfg.boot_menu.to_bytes(2, "little"))
            add_boot_menu_key(fw, self.cfg.boot_menu_key)
        e820 = b"".join(e.addr.to_bytes(8, "little") + e.size.to_bytes(8, "little")
                        + e.kind.to_bytes(4, "little") for e in self.layout.e820(firmware=True))
        fw.add_file("etc/e820", e820)
        fw.add_file("etc/boot-fail-wait", (5000).to_bytes(4, "little"))
        fw.register(self.pio)
        return fw

    def add_disk(self, disk: DiskSpec, index: int) -> None:
        from dvmm_shared.virtio import VirtioDeviceId

        from ..runners_resources import disk_args

        runner = self._runner(disk.runner) if disk.socket is None else None
        args = disk_args(runner, disk.image, disk.read_only) if runner and disk.image else []
        if disk.read_only:
            args.append("--read-only")
        self._add_vhost_device(f"blk{index}", VirtioDeviceId.BLOCK, "dvmm_blk", args,
                               disk.socket, BLK_CONFIG_SIZE, disk.restart, runner)

    def add_net(self, net: NetSpec, index: int) -> None:
        from dvmm_shared.virtio import VirtioDeviceId

        runner = self._runner(net.runner) if net.socket is None else None
        args = ["--mac", net.mac or default_mac(index)]
        if net.tap is not None and runner is not None:
            from ..runners_resources import tap_args

            args += tap_args(runner, net.tap, net.queues)
        elif net.peer is not None:
            args += ["--peer", net.peer]
        if net.queues > 1:
            args += ["--queues", str(net.queues)]
        self._add_vhost_device(f"net{index}", VirtioDeviceId.NET, "dvmm_net",
                               args if net.socket is None else [], net.socket, NET_CONFIG_SIZE,
                               net.restart, runner)
        self._add_pxe_rom()

    def _add_vhost_device(self, name: str, device_type: int, module: str, args: list[str],
                          socket: str | None, config_size: int,
                          policy: RestartPolicy | None, runner: Runner | None = None
                          ) -> None:
        """Spawn the backend (or note the socket) and reserve the device's PCI
        slot; the link and the function come up beside the guest (see
        ``vhost_devices``: the device's first access waits for its backend)."""
        backend = None
        if socket is None:
            restart = (self.cfg.restart if policy is None
                       else self.cfg.restart._replace(policy=policy))
            backend = self.supervisor.spawn_python(
                name, module, [*args, *self.cfg.backend_args], restart=restart, control=True,
                standby=self.cfg.standby, runner=runner)
        self._plug(VhostDevice(self, name, device_type, config_size, socket=socket,
                               backend=backend))

    def _runner(self, kind: str | None) -> Runner:
        """How a backend of ours starts (``--backend-runner``, or runner= per device)."""
        from ..runners import RunnerKind, make_runner

        return make_runner(RunnerKind(kind or self.cfg.runner))

    def _plug(self, device: VhostDevice) -> None:
        """The device's PCI slot, held until its backend is up."""
        slot = FIRST_PCI_SLOT + len(self.devices)
        self.pci.add(slot, PendingFunction(device, self.pci, slot))
        self.devices.append(device)

    def _add_display(self, spec: DisplaySpec) -> None:
        """The display process (a backend like the others, spawned by the
        supervisor), ramfb for the firmware, and the link that hands the
        display guest RAM (``display``)."""
        from dvmm_shared.virtio import VirtioDeviceId

        from .display import (
            DISPLAY_MODULE,
            DISPLAY_NAME,
            INPUT_CONFIG_SIZE,
            DisplayLink,
            input_sockets,
        )
        from .ramfb import VGABIOS_RAMFB, Ramfb, load_vga_rom

        try:
            rom = load_vga_rom()
        except (OSError, ValueError) as exc:
            raise MachineError(f"--display needs {VGABIOS_RAMFB}: {exc}") from None
        inputs = input_sockets(self.supervisor.socket_path) if spec.input == "virtio" else {}
        args = spec.backend_args(self.supervisor.control_endpoint("core"), inputs)
        backend = self.supervisor.spawn_python(DISPLAY_NAME, DISPLAY_MODULE,
                                               [*args, *self.cfg.backend_args],
                                               restart=self.cfg.restart, control=True,
                                               standby=self.cfg.standby)
        device = None
        if spec.gpu == "virtio":  # the display's link is this device's (``display``)
            device = VhostDevice(self, DISPLAY_NAME, VirtioDeviceId.GPU, GPU_CONFIG_SIZE,
                                 backend=backend)
            self._plug(device)
        for kind, path in inputs.items():  # virtio-input-pci (1af4:1052), same process
            self._plug(VhostDevice(self, f"{DISPLAY_NAME}-{kind}", VirtioDeviceId.INPUT,
                                   INPUT_CONFIG_SIZE, backend=backend, backend_socket=path))
        self.display = DisplayLink(self, backend, device=device)
        self.ramfb = Ramfb(self.ram.mem, self.display.show)
        self.ramfb.attach(self.fw_cfg, rom)

    def input_events(self, events: Any) -> int:
        """The control plane's ``input`` command (display process -> PS/2);
        raises ValueError (``InputError``) for malformed events."""
        return self.i8042.input(parse_input_events(events))

    def _add_pxe_rom(self) -> None:
        """iPXE for virtio-net, offered the way SeaBIOS looks for a device's
        option ROM first: a fw_cfg file named after the PCI IDs (notes:
        seabios.md section 4).  Debian's pxe-virtio.rom matches 1af4:1041."""
        name = "pci1af4,1041.rom"
        if not self.cfg.net_rom or name in self._roms:
            return
        try:
            with open(self.cfg.net_rom, "rb") as f:
                self.fw_cfg.add_file(name, f.read())
        except OSError as exc:
            log.warning("no network boot ROM (%s): %s", self.cfg.net_rom, exc.strerror)
            return
        self._roms.add(name)

    def _load_firmware(self, path: str) -> mmap.mmap:
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise MachineError(f"cannot read firmware {path}: {exc.strerror}") from None
        if not image or len(image) % 65536 or len(image) > 16 << 20:
            raise MachineError(f"firmware {path} is {len(image)} bytes, not a BIOS image "
                               "(a multiple of 64 KiB up to 16 MiB)")
        rom = mmap.mmap(-1, len(image))
        rom.write(image)
        return rom

    # -- VM instance ----------------------------------------------------------
    def _create_instance(self) -> None:
        vm = self.kvm.create_vm()
        try:
            vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
            vm.set_tss_addr(KVM_TSS_ADDR)
            vm.create_irqchip()
            vm.create_pit2(speaker_dummy=True)
            for slot, region in zip((SLOT_LOW, SLOT_HIGH), self.ram.regions, strict=False):
                vm.set_user_memory_region(slot, region.guest_addr, region.size,
                                          region.user_addr)
            if self.bios is not None:
                self._map_bios(vm)
            supported = self.kvm.supported_cpuid()
            vcpus = []
            for i in range(self.cfg.cpus):
                vcpu = vm.create_vcpu(i)
                vcpu.setup_cpuid(supported, self.cfg.cpus)
                vcpus.append(vcpu)
        except BaseException:
            vm.close()
            raise
        self.vm, self.vcpus = vm, vcpus
        self.router.attach(vm)
        for device in self.virtio:
            device.transport.attach_vm(self)
        self.runners = [VcpuRunner(v, self.pio, self.mmio, self._vcpu_event) for v in vcpus]

    def _map_bios(self, vm: Vm) -> None:
        assert self.bios is not None
        size = len(self.bios)
        vm.set_user_memory_region(SLOT_BIOS, FOUR_GIB - size, size,
                                  buffer_address(memoryview(self.bios)), readonly=True)
        # The last 128 KiB also appear below 1 MiB; SeaBIOS shadows them
        # there itself (PAM writes are accepted and need no remapping because
        # this copy is plain RAM), so refresh it from the pristine image.
        tail = min(size, BIOS_LOW_WINDOW)
        self.ram.mem.write(0x100000 - tail, self.bios[size - tail:size])

    def _destroy_instance(self) -> None:
        for runner in self.runners:
            runner.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        if self.vm is not None:
            self.vm.close()
        self.vm, self.vcpus, self.runners = None, [], []

    # -- proxies the devices use ------------------------------------------------
    def ram_regions(self) -> list[RamRegion]:
        return self.ram.ram_regions()

    def guest_memory(self) -> GuestMemory:
        return self.ram.mem

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        if self.vm is not None:
            self.vm.ioeventfd(fd, addr, length, pio=pio, datamatch=datamatch, deassign=deassign)

    def _irq(self, gsi: int, level: bool) -> None:
        if self.vm is not None:
            self.vm.irq_line(gsi, level)

    # -- lifecycle ------------------------------------------------------------
    def start(self, prepare_boot: Callable[[Machine], None] | None = None) -> None:
        """Backends spawned, VM created, vCPUs running; then the links and the
        control plane (see the module doc for why in this order)."""
        for i, disk in enumerate(self.cfg.disks):
            self.add_disk(disk, i)
        for i, net in enumerate(self.cfg.nets):
            self.add_net(net, i)
        if self.cfg.display is not None:
            self._add_display(self.cfg.display)
        self._create_instance()
        if prepare_boot is not None:
            prepare_boot(self)
        for runner in self.runners:
            runner.start()
        self.state = "running"
        for device in self.devices:
            device.begin()
        if self.display is not None:
            self.display.begin()
        from dvmm_shared.control import ControlError

        try:
            self.control.start()
        except ControlError as exc:
            raise MachineError(str(exc)) from None
        log.info("machine started: %d MiB, %d vCPU(s), %d disk(s), %d NIC(s)",
                 self.cfg.memory >> 20, self.cfg.cpus, len(self.cfg.disks),
                 len(self.cfg.nets))

    def run(self, until: Callable[[str, str], bool] | None = None) -> str:
        """Serve machine events until shutdown/stop; returns why it ended."""
        while True:
            kind, detail = self.events.get()
            if until is not None and until(kind, detail):
                return kind
            if kind == "reset":
                self.reset(detail)
            elif kind == "backend-exit":
                continue
            else:
                self.failure = detail
                if kind != "start-failed":  # the caller reports that one, as at start
                    level = logging.INFO if kind in ("stop", "shutdown") else logging.ERROR
                    log.log(level, "machine %s: %s", kind, detail)
                return kind

    def request_stop(self, why: str) -> None:
        self.events.put(("stop", why))

    def reset(self, why: str) -> None:
        log.info("resetting the machine (%s)", why)
        self.resets += 1
        self.publish("guest-reset", {"reason": why, "resets": self.resets})
        for runner in self.runners:
            runner.stop()
        # Devices first, while the old VM still exists to undo their ioeventfds.
        self.pci.reset()
        self.serial.reset()
        self.cmos.reset()
        self.fw_cfg.reset()
        self.i8042.reset()
        self._destroy_instance()
        self._create_instance()
        if not self.paused:  # a QMP ``stop`` holds the vCPUs across a reset (qmp/vmctl.py)
            for runner in self.runners:
                runner.start()

    def _guest_reset(self) -> None:
        """A reset register was written (on a vCPU thread): that vCPU must not
        execute another instruction, as on real hardware, so it stops here."""
        for runner in self.runners:
            if runner.is_current_thread:
                runner.stop()
        self.events.put(("reset", "guest reset request"))

    def _vcpu_event(self, kind: str, detail: str) -> None:
        self.events.put((kind, detail))

    def _backend_exited(self, backend: Backend) -> None:
        self.events.put(("backend-exit", f"{backend.name} {backend.describe_exit()}"))

    def start_failed(self, reason: str) -> None:
        """A device's backend never came up (on its connector thread)."""
        self.events.put(("start-failed", reason))

    def publish(self, event: str, fields: dict[str, Any]) -> None:
        """Every supervisor and link event: published; a backend given up
        takes its device offline for good."""
        self.control.emit(event, fields)
        if self.display is not None:
            self.display.on_event(event, fields)
        if event == "backend-given-up":
            link = self.links.get(fields.get("name", ""))
            if link is not None:
                link.give_up(str(fields.get("reason", "given up")))

    def shutdown(self, why: str = "shutdown") -> None:
        self.state = "stopping"
        for device in self.devices:
            device.cancel()  # first: a vCPU may be waiting for a backend
        self._destroy_instance()
        for device in self.devices:
            device.close()
        if self.display is not None:
            self.display.close()
        self.supervisor.stop_all()
        self.publish("vm-stopped", {"reason": why})
        self.control.close()
        self.pump.close()
        self.kvm.close()
        os.close(self.ram.fd)

