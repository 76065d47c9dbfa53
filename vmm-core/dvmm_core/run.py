"""``dvmm run``: start a virtual machine on the dvmm core.

Owns the command line of the core, turning it into a :class:`MachineConfig`,
the serial console plumbing (stdio, a file, or nothing), start-up checks
that fail with one line (no /dev/kvm, missing files, too much memory, a
socket nobody listens on), and the process conventions: SIGTERM/SIGINT stop
the VM and its backends cleanly; no daemonizing.

It imports only what reaching the first guest instruction needs (``python
-X importtime -m dvmm_core.cli run ...`` shows it): no psutil (free memory
comes from /proc/meminfo), no ZeroMQ (the control plane opens after the
first instruction), no Linux boot code unless ``--kernel``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from dvmm_shared.cli import UsageError, add_logging_args, one_line, setup_logging

from .config_file import apply as apply_config
from .config_file import mark_defaults
from .console import Console, parse_escape_char
from .kvm.ioctls import KvmError
from .machine.pc import DiskSpec, Machine, MachineConfig, MachineError, NetSpec
from .qmp.options import add_arguments as add_management_args
from .runners import RunnerError, RunnerKind
from .supervisor import RestartPolicy, RestartSpec, SupervisorError

if TYPE_CHECKING:
    from .machine.display import DisplaySpec

log = logging.getLogger("dvmm.run")

SEABIOS = "/usr/share/seabios/bios.bin"
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

DESCRIPTION = """\
Run a virtual machine.  The core owns /dev/kvm, the vCPUs and guest RAM; each
disk is served by its own backend process over vhost-user (a dvmm blk backend
it starts, or any external vhost-user-blk server such as qemu-storage-daemon).
Without --kernel the machine boots firmware (SeaBIOS), which boots the disks
in order.
"""

EPILOG = """\
examples:
  dvmm run --firmware seabios --disk disk.img
  dvmm run --disk a.img --disk b.img,read-only --cpus 2 --memory 512
  dvmm run --vhost-user-blk /run/qsd/blk.sock
  dvmm run --net tap=tap0,mac=52:54:00:12:34:56       (iPXE network boot)
  dvmm run --kernel bzImage --initrd initrd.img --cmdline "console=ttyS0" --disk root.img
  dvmm run --disk a.img,restart=never --restart always
  dvmm run --disk a.img --display vnc=127.0.0.1:5900    (watch and type with a VNC client)
  dvmm run --disk a.img --backend-runner bwrap          (each backend in a sandbox)
  dvmm run --disk a.img,runner=docker --net tap=tap0,runner=bwrap

Crash recovery: a backend that dies is restarted by its policy (--restart,
or restart= per device) and the core reconnects and replays the device
set-up and the requests that were in flight; the guest sees only a pause.
External backends (--vhost-user-blk, --net socket=) are not restarted by
dvmm, but the core reconnects whenever one listens again.  Watch it with
`dvmm events`, `dvmm status`; inject faults with `dvmm fault`.

Sandboxes: every backend drops its capabilities, can gain no privileges and
runs under a seccomp allow-list once it serves; the core opens the images and
TAPs and hands the backends fds.  --backend-runner bwrap adds a bubblewrap
sandbox per backend (own namespaces, read-only system, only its socket
directory); docker runs each in a container of the dvmm-blk / dvmm-net image
(`dvmm docker build`).  The display process always runs as a plain process.

On a terminal the serial console is raw: Ctrl-A x quits, Ctrl-A h lists the
keys, Ctrl-A c switches to a monitor prompt (info status, stop, cont,
system_reset, quit, ...) and back; Ctrl-A Ctrl-A sends Ctrl-A.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a virtual machine", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", "-m", type=int, default=256, metavar="MiB",
                   help="guest RAM in MiB (default 256)")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    p.add_argument("--hugepages", action="store_true",
                   help="back guest RAM with hugepages (MFD_HUGETLB)")
    p.add_argument("--firmware", metavar="seabios|PATH",
                   help="BIOS image to boot (default: Debian's SeaBIOS when no --kernel)")
    p.add_argument("--kernel", metavar="BZIMAGE", help="boot this Linux kernel directly")
    p.add_argument("--initrd", metavar="FILE", help="initial ramdisk for --kernel")
    p.add_argument("--cmdline", default="console=ttyS0 reboot=k panic=1 pci=conf1",
                   help="kernel command line for --kernel")
    p.add_argument("--disk", action="append", default=[],
                   metavar="IMAGE[,read-only][,restart=POLICY][,runner=R]",
                   help="a virtio-blk disk served by a dvmm blk backend process (repeatable)")
    p.add_argument("--vhost-user-blk", action="append", default=[], metavar="SOCKET",
                   help="a virtio-blk disk served by an external vhost-user backend")
    p.add_argument("--net", action="append", default=[],
                   metavar="tap=NAME|peer=PATH|socket=PATH[,mac=MAC][,queues=N][,restart=P]"
                           "[,runner=R]",
                   help="a virtio-net NIC served by a dvmm net backend on a TAP device or "
                        "a VM-to-VM peer link, or by an external vhost-user-net socket")
    p.add_argument("--display",
                   metavar="vnc=HOST:PORT[,password-file=F][,gpu=virtio][,input=virtio]",
                   help="a display process serving the screen (ramfb) over VNC; VNC "
                        "keyboard and mouse reach the guest as PS/2 devices; gpu=virtio "
                        "adds a virtio-gpu-pci function served by the same process")
    p.add_argument("--boot-menu", nargs="?", type=int, const=2500, metavar="MS",
                   help="let SeaBIOS offer its boot menu (ESC or F12), waiting MS "
                        "milliseconds for the key (default 2500)")
    p.add_argument("--boot-menu-key", choices=("esc", "f12"), default="esc",
                   help="the key that opens the boot menu (default esc)")
    p.add_argument("--restart", default="on-failure", type=_policy,
                   metavar="always|on-failure|never",
                   help="restart policy of the backends dvmm starts (default on-failure: "
                        "restarted unless they exit with status 0)")
    p.add_argument("--restart-limit", default="10/60", type=_limit, metavar="N/SECONDS",
                   help="give a backend up after N restarts within SECONDS (default 10/60)")
    p.add_argument("--backend-runner", default="process", type=_runner,
                   metavar="process|bwrap|docker",
                   help="how dvmm starts its backends: plain processes (default), each in a "
                        "bubblewrap sandbox, or each in a Docker container; per device: "
                        "runner= in --disk/--net")
    p.add_argument("--backend-test-hooks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-standby", dest="standby", action="store_false",
                   help="do not keep a warm standby process per backend (restarts then "
                        "start a new interpreter: ~200 ms slower, one process fewer)")
    p.add_argument("--serial", default="stdio", metavar="stdio|file:PATH|none",
                   help="where COM1 goes (default stdio)")
    p.add_argument("--escape-char", default="ctrl-a", type=_escape, metavar="ctrl-X|CODE",
                   help="the console's escape key (default ctrl-a; QEMU's -echr): then x "
                        "quits, h helps, c switches to the monitor")
    p.add_argument("--kvm", default="/dev/kvm", metavar="PATH",
                   help="the KVM device (default /dev/kvm)")
    p.add_argument("--firmware-log", metavar="FILE",
                   help="write the firmware debug port (0x402) output to FILE")
    add_management_args(p)
    p.add_argument("--config", metavar="FILE.toml",
                   help="read the VM's settings from a TOML file (flags given here override "
                        "it; `dvmm config dump` writes one)")
    add_logging_args(p)
    p.set_defaults(func=run)
    mark_defaults(p)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options with the --config file's values where no flag was given."""
    return apply_config(args, {"disk": parse_disk, "net": parse_net, "display": parse_display})


def _policy(text: str) -> RestartPolicy:
    try:
        return RestartPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _runner(text: str) -> str:
    try:
        return RunnerKind.parse(text).value
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _option_runner(flag: str, text: str, opt: str) -> str:
    try:
        return RunnerKind.parse(opt.partition("=")[2]).value
    except ValueError as exc:
        raise UsageError(f"{flag} {text}: {exc}") from None


def _escape(text: str) -> int:
    try:
        return parse_escape_char(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> tuple[int, float]:
    count, sep, window = text.partition("/")
    try:
        if sep and int(count) >= 0 and float(window) > 0:
            return int(count), float(window)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not N/SECONDS (e.g. 10/60)")


def parse_disk(text: str) -> DiskSpec:
    path, _, opts = text.partition(",")
    spec = DiskSpec()
    for opt in filter(None, opts.split(",")):
        if opt in ("read-only", "ro", "readonly=on"):
            spec.read_only = True
        elif opt.startswith("restart="):
            spec.restart = _option_policy("--disk", text, opt)
        elif opt.startswith("runner="):
            spec.runner = _option_runner("--disk", text, opt)
        else:
            raise UsageError(f"--disk {text}: unknown option {opt!r} (known: read-only, "
                             "restart=always|on-failure|never, runner=process|bwrap|docker)")
    if not os.path.exists(path):
        raise UsageError(f"--disk {path}: no such file")
    spec.image = os.path.abspath(path)
    return spec


def _option_policy(flag: str, text: str, opt: str) -> RestartPolicy:
    try:
        return RestartPolicy.parse(opt.partition("=")[2])
    except ValueError as exc:
        raise UsageError(f"{flag} {text}: {exc}") from None


def parse_net(text: str) -> NetSpec:
    spec = NetSpec()
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise UsageError(f"--net {text}: expected KEY=VALUE, got {item!r}")
        if key in ("tap", "peer", "socket", "mac"):
            setattr(spec, key, value)
        elif key == "queues" and value.isdigit() and 1 <= int(value) <= 16:
            spec.queues = int(value)
        elif key == "restart":
            spec.restart = _option_policy("--net", text, item)
        elif key == "runner":
            spec.runner = _option_runner("--net", text, item)
        else:
            raise UsageError(f"--net {text}: bad option {item!r} (known: tap=, peer=, "
                             "socket=, mac=, queues=1..16, restart=, runner=)")
    if sum(x is not None for x in (spec.tap, spec.peer, spec.socket)) != 1:
        raise UsageError(f"--net {text}: give exactly one of tap=, peer= or socket=")
    if spec.mac is not None and not MAC.fullmatch(spec.mac):
        raise UsageError(f"--net {text}: {spec.mac!r} is not a MAC address")
    return spec


def parse_display(text: str) -> DisplaySpec:
    """``vnc=HOST:PORT[,password-file=F][,gpu=virtio][,input=virtio]``."""
    from .machine.display import DisplaySpec

    vnc, password, gpu, input_ = None, None, None, None
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if key == "vnc" and sep and value:
            host, colon, port = value.rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise UsageError(f"--display {text}: vnc= needs HOST:PORT, got {value!r}")
            vnc = value
        elif key == "password-file" and sep and value:
            if not os.path.isfile(value):
                raise UsageError(f"--display {text}: password file {value} does not exist")
            password = os.path.abspath(value)
        elif key == "gpu" and sep:
            if value != "virtio":
                raise UsageError(f"--display {text}: gpu= must be virtio, got {value!r}")
            gpu = value
        elif key == "input" and sep:
            if value != "virtio":
                raise UsageError(f"--display {text}: input= must be virtio, got {value!r}")
            input_ = value
        else:
            raise UsageError(f"--display {text}: bad option {item!r} "
                             "(known: vnc=HOST:PORT, password-file=F, gpu=virtio, "
                             "input=virtio)")
    if vnc is None:
        raise UsageError(f"--display {text}: give vnc=HOST:PORT")
    return DisplaySpec(vnc, password, gpu, input_)


def build_config(args: argparse.Namespace) -> MachineConfig:
    if not 1 <= args.cpus <= 64:
        raise UsageError(f"--cpus must be 1..64, not {args.cpus}")
    if args.memory < 16:
        raise UsageError(f"--memory must be at least 16 MiB, not {args.memory}")
    check_memory(args.memory << 20)
    firmware = args.firmware
    if firmware is None and args.kernel is None:
        firmware = "seabios"
    if firmware == "seabios":
        firmware = SEABIOS
    for what, path in (("firmware", firmware), ("kernel", args.kernel),
                       ("initrd", args.initrd)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{what} file {path} does not exist")
    disks = [parse_disk(d) for d in args.disk]
    disks += [DiskSpec(socket=s) for s in args.vhost_user_blk]
    nets = [parse_net(n) for n in args.net]
    display = parse_display(args.display) if args.display is not None else None
    if args.boot_menu is not None and not 0 <= args.boot_menu <= 0xFFFF:
        raise UsageError(f"--boot-menu must be 0..65535 ms, not {args.boot_menu}")
    return MachineConfig(memory=args.memory << 20, cpus=args.cpus, firmware=firmware,
                         kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                         disks=disks, nets=nets, hugepages=args.hugepages,
                         backend_args=backend_log_args(args), kvm_path=args.kvm,
                         restart=RestartSpec(policy=args.restart, limit=args.restart_limit[0],
                                             window=args.restart_limit[1]),
                         standby=args.standby, runner=args.backend_runner, display=display,
                         boot_menu=args.boot_menu,
                         boot_menu_key=args.boot_menu_key)


def backend_log_args(args: argparse.Namespace) -> list[str]:
    """Backends log at the core's level (``-q`` quiet, ``-vv`` every message)."""
    hooks = ["--test-hooks"] if getattr(args, "backend_test_hooks", False) else []
    if args.quiet:
        return ["-q", *hooks]
    return (["-v"] if args.verbose > 1 else []) + hooks


def check_memory(size: int, meminfo: str = "/proc/meminfo") -> None:
    """Refuse RAM the host cannot give rather than die on the first touch
    (what psutil reports as available memory plus free swap)."""
    fields: dict[str, int] = {}
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "SwapFree"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return  # cannot tell: let the allocation decide
    avail = fields.get("MemAvailable", 0) + fields.get("SwapFree", 0)
    if "MemAvailable" in fields and size > avail:
        raise UsageError(f"--memory {size >> 20} MiB is more than the host can give "
                         f"({avail >> 20} MiB available)")


def serial_sink(spec: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """The COM1 output function and a closer, for ``stdio``, ``file:PATH`` or ``none``."""
    if spec == "stdio":
        return (lambda data: _write_all(1, data)), (lambda: None)
    if spec == "none":
        return (lambda data: None), (lambda: None)
    if spec.startswith("file:"):
        try:
            fd = os.open(spec[5:], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UsageError(f"--serial {spec}: {one_line(exc)}") from None
        return (lambda data: _write_all(fd, data)), (lambda: os.close(fd))
    raise UsageError(f"--serial {spec!r}: use stdio, file:PATH or none")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue
        except OSError:
            return  # console gone; the guest keeps running


def log_sink(path: str | None) -> Callable[[bytes], None] | None:
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"--firmware-log {path}: {one_line(exc)}") from None
    return lambda data: _write_all(fd, data)


#: How long a Python thread may hold the GIL while another waits for it (CPython's
#: default is 5 ms).  A vCPU thread returning from KVM_RUN needs the GIL to serve
#: the exit; while the main thread works (opening the control plane right after
#: the first instruction, replaying a device after a crash) that exit would wait
#: up to the whole interval: a guest stall.
GIL_SWITCH_INTERVAL = 0.001


def run(args: argparse.Namespace) -> int:
    args = resolve_args(args)
    setup_logging("dvmm", args.verbose, args.quiet)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    cfg = build_config(args)
    sink, close_sink = serial_sink(args.serial)
    console = Console(args.escape_char) if args.serial == "stdio" else None
    cfg.serial_sink = sink if console is None else console.write
    cfg.firmware_log = log_sink(args.firmware_log)
    from .qmp.address import parse_address
    from .qmp.manager import Management

    qmp = [parse_address(a) for a in args.qmp]
    if args.kernel:
        warn_if_no_hw_kvm()
    machine = start_machine(cfg)
    mgmt = Management(machine, qmp, args.name, args.uuid)
    try:
        mgmt.start()
    except UsageError:
        machine.shutdown("error")
        raise
    if console is not None:
        console.attach(machine, mgmt.hmp)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: machine.request_stop(signal.Signals(s).name))
    why = "error"
    try:
        why = mgmt.run()
    finally:
        if console is not None:
            console.close()
        machine.shutdown(why)
        mgmt.close()
        close_sink()
    if why == "start-failed":  # a backend never came up: a start-up error, one line
        raise UsageError(machine.failure)
    log.info("stopped (%s)", why)
    return 0 if why in ("stop", "shutdown") else 1


def start_machine(cfg: MachineConfig, prepare: Callable[[Machine], None] | None = None
                  ) -> Machine:
    """Build and start the machine; every start-up failure becomes one line
    (a backend that fails after the vCPUs started ends ``Machine.run`` with
    ``start-failed``; ``run`` reports it the same way)."""
    if prepare is None and cfg.kernel:
        from .boot.direct import prepare_linux
        prepare = prepare_linux
    machine: Machine | None = None
    try:
        machine = Machine(cfg)
        machine.start(prepare)
        return machine
    except (KvmError, MachineError, SupervisorError, RunnerError) as exc:
        if machine is not None:
            machine.shutdown()
        raise UsageError(str(exc)) from None
    except OSError as exc:
        if machine is not None:
            machine.shutdown()
        raise UsageError(one_line(exc)) from None


def warn_if_no_hw_kvm() -> None:
    from .kvm import probe_host

    result = probe_host()
    if not result.hardware_speed:
        log.warning("%s", result.reason)
