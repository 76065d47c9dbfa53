"""``dvmm backend display``: the display process (virtio-gpu over vhost-user + VNC).

Owns the command line, start-up checks (the password file reads, the VNC
address and the vhost-user socket can be bound) and the process conventions:
logs on stderr, one-line errors with a non-zero exit, a clean exit on
SIGTERM (sockets closed, the socket file removed), no daemonizing, and
``--standby-fd`` for the supervisor's warm standby.

Threads: the vhost-user daemon loop (main thread), the VNC loop
(:mod:`.server`), the input sender (:mod:`.input`) and the control server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dvmm_shared import backend_args
from dvmm_shared.backend_args import add_common_tail, add_listen_args, check_listen_args
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

from .commands import DisplayCommands
from .des import PASSWORD_SIZE
from .device import GpuDevice
from .framebuffer import PreferredSource, ScanoutSource
from .input import InputForwarder
from .server import DEFAULT_CLIENT_TIMEOUT, VncServer, parse_listen

log = logging.getLogger("dvmm.display")

DESCRIPTION = """\
Show a virtual machine's screen to VNC clients and send their keyboard and
pointer input back.  The frontend (the dvmm core) connects to the vhost-user
socket and hands over guest memory; the core's "ramfb" command says where
the firmware framebuffer lies in it, and this process reads the pixels
straight from the shared memory.  Serves virtio-gpu (device id 16, control
and cursor queues) over the same socket.
"""

EPILOG = """\
example:
  dvmm backend display --socket /tmp/gpu.sock --vnc 127.0.0.1:5900 \\
      --password-file pw.txt --control ipc:///tmp/display.ctl \\
      --core-control ipc:///run/vm/core.ctl
  vncviewer 127.0.0.1:5900
"""

CAPABILITIES = {"type": "gpu", "features": []}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_listen_args(p)
    p.add_argument("--vnc", metavar="HOST:PORT",
                   help="address of the VNC server (port 0: any free port, see 'stats')")
    p.add_argument("--password-file", metavar="FILE",
                   help="require VNC authentication with the password on the file's "
                        f"first line (only its first {PASSWORD_SIZE} bytes count)")
    p.add_argument("--core-control", metavar="ENDPOINT",
                   help="the core's control endpoint, where VNC key and pointer events "
                        "are sent (the core passes ipc://RUNTIME/core.ctl)")
    p.add_argument("--input-socket", metavar="PATH",
                   help="vhost-user-input socket for virtio-input (not served yet: "
                        "accepted for the core's command line, a warning is logged)")
    p.add_argument("--client-timeout", type=float, default=DEFAULT_CLIENT_TIMEOUT,
                   metavar="SECONDS",
                   help="drop a VNC client that stalls this long: handshake unfinished, "
                        "a message half sent, or updates not read (default %(default)g)")
    p.add_argument("--name", default="dvmm", help="desktop name shown by VNC clients")
    add_common_tail(p)


def build_parser(prog: str = "dvmm backend display") -> argparse.ArgumentParser:
    return backend_args.build_parser(prog, DESCRIPTION, EPILOG, add_arguments)


def read_password(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            line = f.readline(4096).rstrip(b"\r\n")
    except OSError as exc:
        raise UsageError(f"--password-file: {one_line(exc)}") from None
    if not line:
        raise UsageError(f"--password-file {path}: the first line is empty")
    if len(line) > PASSWORD_SIZE:
        log.warning("VNC passwords are %d bytes: the rest of the password is ignored",
                    PASSWORD_SIZE)
    return line


def check_args(args: argparse.Namespace) -> tuple[str, int]:
    check_listen_args(args)
    if not args.vnc:
        raise UsageError("--vnc HOST:PORT is required")
    if not 0 < args.client_timeout <= 3600:
        raise UsageError(f"--client-timeout must be in (0, 3600], not {args.client_timeout}")
    try:
        return parse_listen(args.vnc)
    except ValueError as exc:
        raise UsageError(f"--vnc: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    wait_for_activation(args.standby_fd)
    host, port = check_args(args)
    setup_logging("dvmm-display", args.verbose, args.quiet)
    password = read_password(args.password_file) if args.password_file else None
    if args.input_socket:
        log.warning("--input-socket %s: virtio-input is not served yet; VNC input reaches "
                    "the guest as PS/2 through the core only", args.input_socket)
    device = GpuDevice()
    scanout = ScanoutSource(device.memory)
    # virtio-gpu's scanout once a driver sets one; ramfb (firmware) before that
    source = PreferredSource(device.table.presented, lambda: device.table.cursor, scanout)
    forwarder = InputForwarder(args.core_control)
    try:
        server = VncServer(host, port, source, forwarder, password=password,
                           name=args.name, client_timeout=args.client_timeout)
    except OSError as exc:
        forwarder.close()
        raise UsageError(f"cannot listen on {args.vnc}: {one_line(exc)}") from None
    try:
        daemon = Daemon.listening(device, args.socket, args.fd)
    except OSError as exc:
        server.stop()
        forwarder.close()
        raise UsageError(f"cannot listen on {args.socket or args.fd}: {one_line(exc)}") from None
    commands = DisplayCommands(scanout, server, device, forwarder)
    control = serve_commands(args.control, daemon, commands) if args.control else None
    daemon.install_signal_handlers()
    server.start()
    vhost, vport = server.address
    log.info("VNC server on %s:%d%s", vhost, vport, " (password required)" if password else "")
    try:
        daemon.serve_forever()
    finally:
        if control is not None:
            control.close()
        server.stop()
        forwarder.close()
    log.info("stopped: %d VNC clients served, %d input events sent",
             server.stats.accepted, forwarder.stats.sent)
    return 0


def serve_commands(endpoint: str, daemon: Daemon, commands: DisplayCommands) -> CommandServer:
    try:
        control = start_control(daemon, endpoint, commands.stats)
    except ControlError as exc:
        daemon.close()
        commands.server.stop()
        commands.forwarder.close()
        raise UsageError(str(exc)) from None
    commands.install(control)
    return control


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("dvmm backend display", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
