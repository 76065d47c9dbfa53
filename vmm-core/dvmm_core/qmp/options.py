"""The management options of ``dvmm run`` (``--qmp``, ``--name``, ``--uuid``).

Kept apart so that building the ``run`` parser imports nothing of the
QMP server itself.
"""

from __future__ import annotations

import argparse
import re

UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
NIL_UUID = "00000000-0000-0000-0000-000000000000"


def _uuid(text: str) -> str:
    if not UUID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID "
                                         "(xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return text.lower()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", action="append", default=[],
                   metavar="unix:PATH[,server=on,wait=off]|tcp:HOST:PORT",
                   help="serve QMP (QEMU's management protocol: qemu.qmp, qmp-shell, "
                        "libvirt-style tools) on this socket (repeatable)")
    p.add_argument("--name", metavar="NAME", help="the VM's name (QMP query-name)")
    p.add_argument("--uuid", type=_uuid, metavar="UUID",
                   help="the VM's UUID (QMP query-uuid)")
