"""The final checks of a campaign's qcow2 image, once the VM has stopped.

Owns ``qemu-img check`` (no corruptions, no leaks, no check errors) and the
content check against the guest tool ``blkverify``'s pattern
(:mod:`dvmm_core.guest.blkpattern`): the image, read through ``qemu-img
convert`` (so through qcow2's own mapping, not dvmm's), must hold in each
block exactly the block the last completed pass wrote — or, when the guest
could not finish its pass, that block or the one the pass under way wrote
(both were acknowledged or in flight; nothing else may appear).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from dvmm_core.guest import blkpattern


def qemu_img_check(image: Path) -> dict[str, Any]:
    """``qemu-img check``'s JSON report, plus ``clean``."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(image)],
                          capture_output=True, text=True, timeout=120)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        report = {"error": (proc.stderr.strip() or "no output").splitlines()[-1]}
    report["status"] = proc.returncode
    report["clean"] = proc.returncode == 0 and not any(
        report.get(k) for k in ("corruptions", "leaks", "check-errors", "error"))
    return report


def pattern_check(image: Path, raw: Path, size: int, last_pass: int, seed: int, *,
                  exact: bool) -> list[str]:
    """The blocks of ``image`` that are not ``last_pass``'s (or, unless ``exact``,
    the next pass's); a line each."""
    proc = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image),
                           str(raw)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return [f"qemu-img convert failed: {proc.stderr.strip()}"]
    zero = bytes(blkpattern.BLOCK)
    bad = []
    try:
        with raw.open("rb") as f:
            for n in range(size // blkpattern.BLOCK):
                got = f.read(blkpattern.BLOCK)
                if got == blkpattern.block(n, last_pass, seed) if last_pass else got == zero:
                    continue
                if not exact and got == blkpattern.block(n, last_pass + 1, seed):
                    continue
                bad.append(str(blkpattern._describe(n, got)))
    finally:
        raw.unlink(missing_ok=True)
    return bad
