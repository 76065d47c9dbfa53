"""``dvmm backend display``: the display process (virtio-gpu over vhost-user + VNC).

Owns the command line, start-up checks (the password file reads, the VNC
address and the vhost-user socket can be bound) and the process conventions:
logs on stderr, one-line errors with a non-zero exit, a clean exit on
SIGTERM (sockets closed, the socket file removed), no daemonizing, and
``--standby-fd`` for the supervisor's warm standby.

Threads: the vhost-user daemon loop of virtio-gpu (main thread), one
daemon loop per virtio-input device (``--input-socket`` keyboard,
``--tablet-socket`` tablet: :mod:`.input_device`), the VNC loop
(:mod:`.server`), the PS/2 input sender (:mod:`.input`) and the control
server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable

from dvmm_shared import backend_args, sandbox
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

from .commands import DisplayCommands
from .des import PASSWORD_SIZE
from .device import GpuDevice
from .evdev import keyboard_spec, tablet_spec
from .framebuffer import (
    BLANK_HEIGHT,
    BLANK_WIDTH,
    MAX_DIMENSION,
    PreferredSource,
    ScanoutSource,
)
from .input import InputForwarder
from .input_device import InputDevice, InputRouter
from .server import DEFAULT_CLIENT_TIMEOUT, VncServer, parse_listen

log = logging.getLogger("dvmm.display")

DESCRIPTION = """\
Show a virtual machine's screen to VNC clients and send their keyboard and
pointer input back.  The frontend (the dvmm core) connects to the vhost-user
socket and hands over guest memory; the core's "ramfb" command says where
the firmware framebuffer lies in it, and this process reads the pixels
straight from the shared memory.  Serves virtio-gpu (device id 16, control
and cursor queues) over the same socket, and virtio-input (device id 18) as
a keyboard and a tablet on sockets of their own (vhost-user-input): VNC
input goes to them once a guest driver runs them, to the core's PS/2
keyboard and mouse before that.
"""

EPILOG = """\
example:
  dvmm backend display --socket /tmp/gpu.sock --vnc 127.0.0.1:5900 \\
      --password-file pw.txt --control ipc:///tmp/display.ctl \\
      --core-control ipc:///run/vm/core.ctl
  vncviewer 127.0.0.1:5900

virtio-input for QEMU:
  dvmm backend display --socket /tmp/gpu.sock --vnc 127.0.0.1:0 \\
      --input-socket /tmp/kbd.sock --tablet-socket /tmp/tablet.sock
  qemu-system-x86_64 ... -chardev socket,id=kbd,path=/tmp/kbd.sock \\
      -device vhost-user-input-pci,chardev=kbd
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
                   help="vhost-user-input socket serving a virtio keyboard "
                        "(e.g. QEMU -device vhost-user-input-pci,chardev=...)")
    p.add_argument("--tablet-socket", metavar="PATH",
                   help="vhost-user-input socket serving a virtio tablet (absolute pointer)")
    p.add_argument("--client-timeout", type=float, default=DEFAULT_CLIENT_TIMEOUT,
                   metavar="SECONDS",
                   help="drop a VNC client that stalls this long: handshake unfinished, "
                        "a message half sent, or updates not read (default %(default)g)")
    p.add_argument("--name", default="dvmm", help="desktop name shown by VNC clients")
    p.add_argument("--size", default="1024x768", metavar="WxH",
                   help="the display size virtio-gpu offers the driver (default %(default)s); "
                        "the control command 'resize' and a VNC client's SetDesktopSize "
                        "change it later (announced with the config event)")
    add_common_tail(p)
    sandbox.add_sandbox_args(p)


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


def parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (
            1 <= int(w) <= MAX_DIMENSION and 1 <= int(h) <= MAX_DIMENSION):
        raise UsageError(f"--size must be WIDTHxHEIGHT, each 1..{MAX_DIMENSION}, not {text!r}")
    return int(w), int(h)


def check_args(args: argparse.Namespace) -> tuple[str, int]:
    check_listen_args(args)
    if not args.vnc:
        raise UsageError("--vnc HOST:PORT is required")
    parse_size(args.size)
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
    drop_privileges()  # before the first thread (see dvmm_shared.sandbox)
    device = GpuDevice(size=parse_size(args.size))
    scanout = ScanoutSource(device.memory)
    # virtio-gpu's scanout once a driver sets one; ramfb (firmware) before that
    source = PreferredSource(device.table.presented, lambda: device.table.cursor, scanout)
    forwarder = InputForwarder(args.core_control)
    inputs = InputDaemons()
    try:
        # Before the gpu socket: whoever waits for that one finds these too.
        router = inputs.listen(args, forwarder, lambda: screen_size(device, scanout))
        server = VncServer(host, port, source, router, password=password,
                           name=args.name, client_timeout=args.client_timeout,
                           resizer=device.request_size)
    except OSError as exc:
        inputs.stop()
        forwarder.close()
        raise UsageError(f"cannot listen on {args.vnc}: {one_line(exc)}") from None
    except UsageError:
        inputs.stop()
        forwarder.close()
        raise
    try:
        daemon = Daemon.listening(device, args.socket, args.fd)
    except OSError as exc:
        server.stop()
        inputs.stop()
        forwarder.close()
        raise UsageError(f"cannot listen on {args.socket or args.fd}: {one_line(exc)}") from None
    device.call_soon = daemon.call_soon
    commands = DisplayCommands(scanout, server, device, forwarder, inputs.devices)
    control = serve_commands(args.control, daemon, commands, inputs) if args.control else None
    daemon.install_signal_handlers()
    server.start()
    inputs.start()
    confine("display", args.seccomp, *([control.close] if control else []), server.stop,
            inputs.stop, forwarder.close, daemon.close)
    vhost, vport = server.address
    log.info("VNC server on %s:%d%s", vhost, vport, " (password required)" if password else "")
    try:
        daemon.serve_forever()
    finally:
        if control is not None:
            control.close()
        server.stop()
        inputs.stop()
        forwarder.close()
    log.info("stopped: %d VNC clients served, %d input events sent",
             server.stats.accepted, forwarder.stats.sent)
    return 0


def screen_size(device: GpuDevice, scanout: ScanoutSource) -> tuple[int, int]:
    """What VNC clients see now (the tablet scales pointer positions to it)."""
    frame = device.table.presented()
    if frame is not None:
        return frame.width, frame.height
    cfg = scanout.config
    return (cfg.width, cfg.height) if cfg is not None else (BLANK_WIDTH, BLANK_HEIGHT)


class InputDaemons:
    """The virtio-input devices and their vhost-user daemons (own threads)."""

    def __init__(self) -> None:
        self.devices: dict[str, InputDevice] = {}
        self.daemons: list[Daemon] = []
        self._threads: list[threading.Thread] = []

    def listen(self, args: argparse.Namespace, forwarder: InputForwarder,
               screen: Callable[[], tuple[int, int]]) -> InputRouter:
        for kind, path, spec in (("keyboard", args.input_socket, keyboard_spec),
                                 ("tablet", args.tablet_socket, tablet_spec)):
            if not path:
                continue
            device = InputDevice(spec())
            try:
                daemon = Daemon(device, path)
            except OSError as exc:
                raise UsageError(f"cannot listen on {path}: {one_line(exc)}") from None
            device.call_soon = daemon.call_soon
            self.devices[kind] = device
            self.daemons.append(daemon)
        return InputRouter(forwarder, self.devices.get("keyboard"), self.devices.get("tablet"),
                           screen)

    def start(self) -> None:
        for daemon, kind in zip(self.daemons, self.devices, strict=True):
            thread = threading.Thread(target=daemon.serve_forever, name=f"input-{kind}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        if not self._threads:  # never served: close the listeners here
            for daemon in self.daemons:
                daemon.close()
        self.daemons.clear()
        self._threads.clear()


def serve_commands(endpoint: str, daemon: Daemon, commands: DisplayCommands,
                   inputs: InputDaemons) -> CommandServer:
    try:
        control = start_control(daemon, endpoint, commands.stats)
    except ControlError as exc:
        daemon.close()
        commands.server.stop()
        inputs.stop()
        commands.forwarder.close()
        raise UsageError(str(exc)) from None
    commands.install(control)
    return control


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("dvmm backend display", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
