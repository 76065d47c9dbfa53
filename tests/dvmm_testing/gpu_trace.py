"""A real Linux virtio-gpu driver's command sequence, recorded from QEMU.

Owns recording (``python tests/dvmm_testing/gpu_trace.py OUT``) and parsing
the recorded trace.  Recording runs the dvmm test guest under QEMU (TCG)
with QEMU's *own* ``virtio-gpu-pci`` (display size 1024x768, what dvmm's
display process announces in GET_DISPLAY_INFO) and QEMU's
``virtio_gpu_cmd_*`` trace events (QEMU hw/display/trace-events) written to a
file, until the guest's virtio_gpu DRM driver has brought up its fbdev
console (``/proc/fb`` names ``virtio_gpudrmfb``).

The kept trace is trimmed: the ``virtio_gpu_features`` lines (QEMU's own
feature queries, not commands) go, and only the first :data:`KEEP` commands
stay -- after those the console only repeats the cursor blink (a transfer
and an 8x16 flush every blink).

What the trace does not carry: QEMU's trace events give the resource id of
ATTACH_BACKING and TRANSFER_TO_HOST_2D but not the backing entries or the
transfer rectangle; a replay supplies its own pages and transfers the whole
resource.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KEEP = 24
_LINE = re.compile(r"(?:\d+@[\d.]+:)?virtio_gpu_(\w+)(?: (.*))?")
_FIELD = re.compile(r"(\w+) (0x[0-9a-fA-F]+|\d+)")


@dataclass(frozen=True)
class TraceCmd:
    """One traced command: ``cmd_res_flush`` with its fields (``res``, ``w`` ...)."""

    name: str
    fields: dict[str, int]


def parse(text: str) -> list[TraceCmd]:
    """The commands of a QEMU ``virtio_gpu_*`` trace (features lines skipped)."""
    cmds = []
    for line in text.splitlines():
        m = _LINE.fullmatch(line.strip())
        if m is None:
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"not a virtio_gpu trace line: {line!r}")
            continue
        name, rest = m.groups()
        if name == "features":
            continue
        cmds.append(TraceCmd(name, {k: int(v, 0) for k, v in _FIELD.findall(rest or "")}))
    return cmds


def record(out: Path, timeout: float = 120.0) -> None:
    """Boot the guest with QEMU's virtio-gpu-pci and keep the trimmed trace in ``out``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dvmm_testing.qemu import QemuGuest

    raw = out.with_suffix(".raw")
    args = ["-device", "virtio-gpu-pci,xres=1024,yres=768",
            "-trace", f"enable=virtio_gpu_*,file={raw}"]
    with QemuGuest(args) as vm:
        deadline = time.monotonic() + timeout
        while "virtio_gpudrmfb" not in vm.check("cat /proc/fb"):
            if time.monotonic() > deadline:
                raise RuntimeError("the guest's virtio_gpu driver brought up no framebuffer")
            time.sleep(0.5)
        while len(parse(raw.read_text())) < KEEP:  # the console's first blinks
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {KEEP} commands traced")
            time.sleep(0.5)
    lines = [ln for ln in raw.read_text().splitlines() if "virtio_gpu_features" not in ln]
    header = ("# QEMU 'virtio_gpu_*' trace of Linux's virtio_gpu driver bringing up its\n"
              "# fbdev console (recorded by tests/dvmm_testing/gpu_trace.py; first "
              f"{KEEP} commands)\n")
    out.write_text(header + "\n".join(lines[:KEEP]) + "\n")
    raw.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gpu_trace.py OUT.trace")
    record(Path(sys.argv[1]))
