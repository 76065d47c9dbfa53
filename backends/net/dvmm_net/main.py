"""``dvmm backend net``: the vhost-user-net backend program.

Owns the command line, start-up checks (the TAP exists and can be
attached, the peer socket can be used, the vhost-user socket can be bound)
and the process conventions: logs on stderr, one-line errors with a
non-zero exit, a clean exit on SIGTERM (sockets removed, counters logged),
no daemonizing.  Follows the vhost-user backend program conventions
(``--socket-path``/``--fd``/``--print-capabilities``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from dvmm_shared import backend_args, sandbox, sandbox_fds
from dvmm_shared.backend_args import (
    add_common_tail,
    add_listen_args,
    check_listen_args,
    confine,
    drop_privileges,
)
from dvmm_shared.cli import (
    UsageError,
    one_line,
    run_main,
    setup_logging,
    wait_for_activation,
)
from dvmm_shared.control import CommandServer, ControlError
from dvmm_shared.vhost_user.control_host import start_control
from dvmm_shared.vhost_user.daemon import Daemon

from .device import MAX_MTU, MIN_MTU, NetDevice
from .faults import FaultyLink, NetFaults
from .link import Link, LinkError
from .peer import PeerLink
from .tap import TapLink

log = logging.getLogger("dvmm.net")

DEFAULT_MAC = "52:54:00:12:34:56"
MAX_QUEUES = 64
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")

DESCRIPTION = """\
Serve a virtio-net device to a virtual machine over a vhost-user socket.
Frames go to an existing TAP interface (checksum and TCP segmentation
offloads are passed through to the kernel), or straight to another VM
whose backend uses the same --peer socket (no TAP, no privileges).  The
frontend (the dvmm core, or QEMU's -netdev vhost-user) connects to the
socket; guest memory and the kick/call eventfds arrive over it.
"""

EPILOG = """\
examples:
  ip tuntap add dev tap0 mode tap      (multi-queue: add multi_queue)
  dvmm backend net --socket /tmp/net.sock --tap tap0 --mac 52:54:00:12:34:56 &
  qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -numa node,memdev=mem -chardev socket,id=n0,path=/tmp/net.sock \\
      -netdev vhost-user,id=net0,chardev=n0 \\
      -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 ...

  two VMs on one link:  --peer /tmp/link.sock on both backends
"""

CAPABILITIES = {"type": "net", "features": ["tap", "tap-fd", "peer", "mac", "mtu", "queues"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_listen_args(p)
    p.add_argument("--tap", metavar="NAME",
                   help="existing TAP interface to attach to")
    p.add_argument("--tap-fd", metavar="N[,N...]",
                   help="already open TAP queue fd(s), one per queue pair")
    p.add_argument("--peer", metavar="PATH",
                   help="VM-to-VM link: listen on PATH, or connect if another backend does")
    p.add_argument("--mac", default=DEFAULT_MAC, metavar="MAC",
                   help=f"MAC address in the device config (default {DEFAULT_MAC})")
    p.add_argument("--mtu", type=int, metavar="N",
                   help=f"advertise VIRTIO_NET_F_MTU with this MTU ({MIN_MTU}..{MAX_MTU})")
    p.add_argument("--queues", type=int, metavar="N",
                   help="queue pairs (default 1; a TAP must be multi_queue for more)")
    p.add_argument("--no-config-space", action="store_true",
                   help="do not offer VHOST_USER_PROTOCOL_F_CONFIG: needed by QEMU 7.2, "
                        "whose vhost-user-net crashes when offered it (QEMU keeps the "
                        "net config space itself; the dvmm core reads it from here)")
    add_common_tail(p)
    sandbox_fds.add_fds_arg(p)
    sandbox.add_sandbox_args(p)


def build_parser(prog: str = "dvmm backend net") -> argparse.ArgumentParser:
    return backend_args.build_parser(prog, DESCRIPTION, EPILOG, add_arguments)


def parse_mac(text: str) -> bytes:
    if not _MAC.fullmatch(text):
        raise UsageError(f"--mac {text!r} is not a MAC address (like {DEFAULT_MAC})")
    mac = bytes(int(x, 16) for x in text.split(":"))
    if mac[0] & 1:
        raise UsageError(f"--mac {text} is a multicast address")
    return mac


def parse_fds(text: str) -> list[int]:
    try:
        fds = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--tap-fd {text!r} is not a list of fd numbers") from None
    if any(fd < 0 for fd in fds) or len(set(fds)) != len(fds):
        raise UsageError(f"--tap-fd {text!r}: fds must be distinct and not negative")
    return fds


def check_args(args: argparse.Namespace) -> int:
    """Validate the combination of options; returns the number of queue pairs."""
    if sum(x is not None for x in (args.tap, args.tap_fd, args.peer)) != 1:
        raise UsageError("give exactly one of --tap NAME, --tap-fd N or --peer PATH")
    check_listen_args(args)
    if args.mtu is not None and not MIN_MTU <= args.mtu <= MAX_MTU:
        raise UsageError(f"--mtu must be {MIN_MTU}..{MAX_MTU}, not {args.mtu}")
    fds = parse_fds(args.tap_fd) if args.tap_fd is not None else None
    queues = args.queues if args.queues is not None else (len(fds) if fds else 1)
    if not 1 <= queues <= MAX_QUEUES:
        raise UsageError(f"--queues must be 1..{MAX_QUEUES}, not {queues}")
    if fds is not None and len(fds) != queues:
        raise UsageError(f"--queues {queues} needs {queues} --tap-fd fds, got {len(fds)}")
    if args.peer is not None and queues != 1:
        raise UsageError("a --peer link has one queue pair (drop --queues)")
    return queues


def open_link(args: argparse.Namespace, queues: int) -> Link:
    try:
        if args.tap is not None:
            return TapLink.open(args.tap, queues)
        if args.tap_fd is not None:
            return TapLink.from_fds(parse_fds(args.tap_fd))
        return PeerLink(args.peer)
    except LinkError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    wait_for_activation(args.standby_fd)
    lifeline = sandbox_fds.apply_handed_fds(args)
    queues = check_args(args)
    mac = parse_mac(args.mac)
    setup_logging("dvmm-net", args.verbose, args.quiet)
    link = open_link(args, queues)
    drop_privileges(link.close)  # before the first thread (see dvmm_shared.sandbox)
    if lifeline is not None:
        sandbox_fds.watch_lifeline(lifeline)
    faults = NetFaults()
    device = NetDevice(FaultyLink(link, faults), mac=mac, mtu=args.mtu, queue_pairs=queues,
                       config_space=not args.no_config_space)
    try:
        daemon = Daemon.listening(device, args.socket, args.fd)
    except OSError as exc:
        link.close()
        raise UsageError(f"cannot listen on {args.socket or args.fd}: {one_line(exc)}") from None
    control = serve_commands(args.control, daemon, device, faults) if args.control else None
    if control is not None and args.test_hooks:
        from dvmm_shared import sandbox_hostile

        sandbox_hostile.install(control, daemon)
    daemon.install_signal_handlers()
    confine("net", args.seccomp, *([control.close] if control else []), daemon.close)
    log.info("serving %s as %s (%d queue pair%s, mtu %s)", link.description, args.mac.lower(),
             queues, "s" if queues > 1 else "", args.mtu or "not advertised")
    try:
        daemon.serve_forever()
    finally:
        if control is not None:
            control.close()
    log.info("stopped: %s", device.stats().summary())
    return 0


def serve_commands(endpoint: str, daemon: Daemon, device: NetDevice,
                   faults: NetFaults | None = None) -> CommandServer:
    """The ``--control`` endpoint: health, stats (with the net counters), faults
    (the frame faults of :mod:`.faults` among them)."""
    try:
        return start_control(daemon, endpoint, lambda: {
            **device.stats().as_dict(),
            "frame_faults": dict(faults.totals) if faults is not None else {}},
            device_faults=faults)
    except ControlError as exc:
        daemon.close()
        raise UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("dvmm backend net", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
