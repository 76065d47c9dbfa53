"""The resources the core opens for its backends (issue 12: by fd, not by
privilege).

Owns the choice, per runner, of how a backend gets its disk image or TAP,
and the opening itself.  Under a sandboxed runner (bubblewrap, Docker) the
core opens the image and attaches the TAP on the backend's behalf, so no
sandboxed backend needs a view of the host's files, ``/dev/net/tun`` or
``CAP_NET_ADMIN``: the fds are handed over by the runner (:mod:`.runners`)
and kept open by the core for the VM's life, so a restarted backend gets
the very same objects again.  The plain process runner keeps the backend
program's own options (``--image PATH``, ``--tap NAME``): the backend
opens them itself, before it drops its capabilities, exactly as when a
user starts ``dvmm backend blk`` by hand.

It does not lock the image: the blk backend takes its ``flock`` on its own
open file description (it re-opens the handed fd through
``/proc/self/fd/N``), so the lock ends with the backend process and a
restarted one can take it again.
"""

from __future__ import annotations

import os

from .machine.pc import MachineError
from .runners import Runner


def disk_args(runner: Runner, image: str, read_only: bool) -> list[str]:
    """The blk backend's options for ``image`` (setting ``runner.fds`` when
    it is handed over as an fd)."""
    if not runner.by_fd:
        return ["--image", image]
    runner.fds["image-fd"] = [open_image(image, read_only)]
    return ["--serial", image_serial(image)]


def tap_args(runner: Runner, name: str, queues: int) -> list[str]:
    """The net backend's options for TAP ``name`` (fds under a sandbox)."""
    if not runner.by_fd:
        return ["--tap", name]
    runner.fds["tap-fd"] = open_tap(name, queues)
    return []


def open_image(path: str, read_only: bool) -> int:
    """The image opened as the backend would (read-write unless ``read_only``)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise MachineError(f"cannot open image {path}: {exc.strerror}") from None


def open_tap(name: str, queues: int) -> list[int]:
    """One fd per queue pair of the existing TAP ``name`` (``IFF_NO_PI |
    IFF_VNET_HDR``, multi-queue for several), as ``dvmm backend net --tap``
    would open them."""
    from dvmm_net.link import LinkError
    from dvmm_net.tap import TapLink

    try:
        link = TapLink.open(name, queues)
    except LinkError as exc:
        raise MachineError(str(exc)) from None
    try:  # the duplicates share the queues' open files, which outlive the link object
        return [os.dup(link.fileno(pair)) for pair in range(link.pairs)]
    finally:
        link.close()


def image_serial(path: str) -> str:
    """The GET_ID serial a backend given the path would report (``dvmm-`` and
    the file name, at most 20 bytes), so handing an fd changes nothing the
    guest sees."""
    return ("dvmm-" + os.path.basename(path))[:20]
