"""``dvmm backend blk``: the vhost-user-blk backend program.

Owns the command line, start-up checks (the image opens, the socket can be
bound) and the process conventions: logs on stderr, one-line errors with a
non-zero exit, a clean exit on SIGTERM (the socket file is removed), no
daemonizing.  Follows the vhost-user "backend program conventions"
(``--socket-path``/``--fd``/``--print-capabilities``) so management tools
can start it like any other vhost-user-blk program.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

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

from .device import BlkDevice
from .disk import Disk, DiskError, FaultyDisk, RawDisk
from .engine import DEFAULT_THREADS, ENGINES, MAX_THREADS, EngineError, make_engine
from .formats import FORMATS, ImageError, open_image, probe_file
from .iofaults import BlkFaults

log = logging.getLogger("dvmm.blk")

DESCRIPTION = """\
Serve a disk image to a virtual machine as a virtio-blk device over a
vhost-user socket.  The frontend (the dvmm core, or QEMU's
vhost-user-blk-pci) connects to the socket; guest memory, kick and call
eventfds arrive over it, and this process does the disk I/O itself.
"""

EPILOG = """\
example, serving QEMU:
  dvmm backend blk --socket /tmp/blk.sock --image disk.img &
  qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/blk.sock \\
      -device vhost-user-blk-pci,chardev=c0 ...
"""

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_listen_args(p)
    p.add_argument("--image", "--blk-file", dest="image", metavar="FILE",
                   help="raw disk image (or block device) to serve")
    p.add_argument("--image-fd", type=int, metavar="N",
                   help="serve the image open as inherited fd N instead of a path (the "
                        "dvmm core opens it: the backend needs no view of the host's files)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="image format: raw, qcow2 (read-write), vmdk, vpc, qed (read-only), "
                        "or auto (the default: detected from the header; an image no "
                        "header matches is raw)")
    p.add_argument("--read-only", action="store_true",
                   help="open the image read-only and advertise VIRTIO_BLK_F_RO")
    p.add_argument("--queues", type=int, default=1, metavar="N",
                   help="number of request queues offered (default 1)")
    p.add_argument("--serial", default=None, metavar="ID",
                   help="serial number returned by GET_ID (max 20 bytes; "
                        "default: dvmm- and the image file name)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="how requests that wait for the disk are served: io_uring "
                        "(several in flight, completed out of order), threads (the same "
                        "with a pool of workers), sync (one at a time on the event "
                        "loop), or auto (the default: io_uring where the kernel allows "
                        "it, else threads)")
    p.add_argument("--io-threads", type=int, default=DEFAULT_THREADS, metavar="N",
                   help=f"worker threads of the threads engine, and of io_uring's "
                        f"fallback (1..{MAX_THREADS}, default {DEFAULT_THREADS})")
    add_common_tail(p)
    sandbox_fds.add_fds_arg(p)
    sandbox.add_sandbox_args(p)


def build_parser(prog: str = "dvmm backend blk") -> argparse.ArgumentParser:
    return backend_args.build_parser(prog, DESCRIPTION, EPILOG, add_arguments)


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    wait_for_activation(args.standby_fd)
    lifeline = sandbox_fds.apply_handed_fds(args)
    if (args.image is None) == (args.image_fd is None):
        raise UsageError("give exactly one of --image FILE or --image-fd N")
    if args.image_fd is not None:
        # Our own open file description (and flock) of the handed file: it
        # ends with this process, so a restarted backend locks it again.
        args.image = f"/proc/self/fd/{args.image_fd}"
    check_listen_args(args)
    if not 1 <= args.queues <= 64:
        raise UsageError(f"--queues must be 1..64, not {args.queues}")
    if not 1 <= args.io_threads <= MAX_THREADS:
        raise UsageError(f"--io-threads must be 1..{MAX_THREADS}, not {args.io_threads}")
    setup_logging("dvmm-blk", args.verbose, args.quiet)
    raw = open_disk(args.image, args.format, args.read_only)
    drop_privileges(raw.close)  # before the first thread (see dvmm_shared.sandbox)
    if lifeline is not None:
        sandbox_fds.watch_lifeline(lifeline)
    # Error injection only where someone can arm it: the plain data path stays as it was.
    disk: Disk = FaultyDisk(raw) if args.control else raw
    serial = args.serial if args.serial is not None else default_serial(args.image)
    try:
        engine = make_engine(args.engine, args.io_threads)
    except EngineError as exc:
        disk.close()
        raise UsageError(str(exc)) from None
    device = BlkDevice(disk, queues=args.queues, serial=serial, engine=engine)
    try:
        daemon = Daemon.listening(device, args.socket, args.fd)
    except OSError as exc:
        device.close()
        raise UsageError(f"cannot listen on {args.socket or args.fd}: {one_line(exc)}") from None
    control = serve_commands(args.control, daemon, device) if args.control else None
    if control is not None and args.test_hooks:
        from dvmm_shared import sandbox_hostile

        sandbox_hostile.install(control, daemon)
    daemon.install_signal_handlers()
    confine("blk", args.seccomp, *([control.close] if control else []), daemon.close)
    log.info("serving %s (%s, %d bytes%s, %d queue%s, %s engine)", args.image,
             getattr(raw, "format_name", "raw"), disk.size,
             ", read-only" if disk.read_only else "", args.queues,
             "s" if args.queues > 1 else "", args.engine)
    try:
        daemon.serve_forever()
    finally:
        if control is not None:
            control.close()
    log.info("stopped: %s", device.stats)
    return 0


def open_disk(path: str, fmt: str, read_only: bool) -> Disk:
    """The image as a :class:`Disk`: a raw file directly, any other format
    through :mod:`dvmm_blk.formats` (a format dvmm only reads is served
    read-only)."""
    try:
        if fmt == "auto":
            fmt = probe_file(path)
        if fmt == "raw":
            return RawDisk(path, read_only=read_only)
        image = open_image(path, fmt, read_only)
    except (DiskError, ImageError) as exc:
        raise UsageError(str(exc)) from None
    if image.read_only and not read_only:
        log.warning("%s images are read-only in dvmm: serving %s read-only", fmt, path)
    return image


def serve_commands(endpoint: str, daemon: Daemon, device: BlkDevice) -> CommandServer:
    """The ``--control`` endpoint: health, stats (with the blk counters), faults."""
    faulty = device.disk if isinstance(device.disk, FaultyDisk) else None

    def device_stats() -> dict[str, Any]:
        injected = {"injected_errors": faulty.injected} if faulty is not None else {}
        return {**asdict(device.stats), **injected}

    try:
        return start_control(daemon, endpoint, device_stats, faulty,
                             device_faults=BlkFaults() if faulty is not None else None)
    except ControlError as exc:
        daemon.close()
        raise UsageError(str(exc)) from None


def default_serial(image: str) -> str:
    return ("dvmm-" + os.path.basename(image))[:20]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("dvmm backend blk", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
