"""What ``dvmm img info|check|snapshot -l`` print, in qemu-img's words.

Owns the reports about an image, as data (the JSON objects qemu-img's
``--output json`` prints, same keys) and as the human text qemu-img prints
(its ``size_to_str`` units, its snapshot table columns).  It reads the
open image; it changes nothing.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from .base import BlockImage
from .qcow2_check import CheckResult
from .qcow2_header import COMPAT_LAZY_REFCOUNTS, COMPRESSION_NAMES, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from .qcow2_image import Qcow2Image
from .qcow2_snapshot import Snapshot

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size_to_str(value: int) -> str:
    """qemu's ``size_to_str``: three significant digits, binary units that
    switch at 1000 (so 1000 KiB reads 0.977 MiB)."""
    if value <= 0:
        return "0 B"
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = min(max((exp - 1) // 10, 0), len(_UNITS) - 1)
    return f"{value / (1 << (i * 10)):0.3g} {_UNITS[i]}"


def snapshot_json(s: Snapshot) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
            "date-sec": s.date_sec, "date-nsec": s.date_nsec,
            "vm-clock-sec": s.vm_clock_nsec // 10**9,
            "vm-clock-nsec": s.vm_clock_nsec % 10**9, "icount": s.icount}


def image_info(img: BlockImage) -> dict[str, Any]:
    """qemu-img's ``ImageInfo`` for one image of a chain."""
    st = os.stat(img.path)
    info: dict[str, Any] = {"virtual-size": img.size, "filename": img.path,
                            "format": img.format_name, "actual-size": st.st_blocks * 512}
    dirty = False
    if isinstance(img, Qcow2Image):
        h = img.header
        info["cluster-size"] = h.cluster_size
        data: dict[str, Any] = {"compat": h.compat_name,
                                "compression-type": COMPRESSION_NAMES[h.compression_type]}
        if h.version == 3:
            data["lazy-refcounts"] = bool(h.compatible & COMPAT_LAZY_REFCOUNTS)
        data["refcount-bits"] = h.refcount_bits
        if h.version == 3:
            data["corrupt"] = bool(h.incompatible & INCOMPAT_CORRUPT)
            data["extended-l2"] = False
        info["format-specific"] = {"type": "qcow2", "data": data}
        dirty = bool(h.incompatible & INCOMPAT_DIRTY)
        if img.snapshots:
            info["snapshots"] = [snapshot_json(s) for s in img.snapshots]
    if img.backing_name:
        info["backing-filename"] = img.backing_name
        info["full-backing-filename"] = img.backing.path if img.backing else img.backing_name
        if img.backing_format:
            info["backing-filename-format"] = img.backing_format
    info["dirty-flag"] = dirty
    return info


def human_info(info: dict[str, Any]) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} "
             f"({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(f"backing file: {info['backing-filename']}")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "snapshots" in info:
        lines.append(snapshot_table(info["snapshots"]).rstrip("\n"))
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        for key, value in spec["data"].items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"    {key.replace('-', ' ')}: {text}")
    return "\n".join(lines) + "\n"


def snapshot_table(snapshots: list[dict[str, Any]]) -> str:
    """qemu-img's ``Snapshot list:`` table (``bdrv_snapshot_dump`` columns)."""
    out = ["Snapshot list:",
           f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s['vm-clock-nsec'] // 1000000:03d}")
        icount = "" if s["icount"] is None else str(s["icount"])
        out.append(f"{s['id']:<9} {s['name']:<16} {size_to_str(s['vm-state-size']):>8}"
                   f"{date:>20}{clock:>13}{icount:>11}")
    return "\n".join(out) + "\n"


def check_json(result: CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    """qemu-img check's JSON object (counts that are 0 left out, as qemu does)."""
    out: dict[str, Any] = {"image-end-offset": result.image_end_offset,
                           "total-clusters": result.total_clusters}
    if result.corruptions:
        out["corruptions"] = result.corruptions
    out["check-errors"] = result.check_errors
    for key, value in (("leaks", result.leaks), ("corruptions-fixed", result.corruptions_fixed),
                       ("leaks-fixed", result.leaks_fixed),
                       ("allocated-clusters", result.allocated_clusters),
                       ("fragmented-clusters", result.fragmented_clusters),
                       ("compressed-clusters", result.compressed_clusters)):
        if value or key == "allocated-clusters":
            out[key] = value
    out["filename"], out["format"] = filename, fmt
    return out


def check_human(result: CheckResult, fixed: bool) -> str:
    """qemu-img check's summary (the per-cluster lines go to stderr)."""
    lines: list[str] = []
    if fixed and (result.leaks_fixed or result.corruptions_fixed):
        lines.append(f"The following inconsistencies were found and repaired:\n\n"
                     f"    {result.leaks_fixed} leaked clusters\n"
                     f"    {result.corruptions_fixed} corruptions\n\n"
                     "Double checking the fixed image now...")
    remaining_c = result.corruptions - result.corruptions_fixed
    remaining_l = result.leaks - result.leaks_fixed
    if not (remaining_c or remaining_l or result.check_errors):
        lines.append("No errors were found on the image.")
    if remaining_c:
        lines.append(f"\n{remaining_c} errors were found on the image.\n"
                     "Data may be corrupted, or further writes to the image may corrupt it.")
    if remaining_l:
        lines.append(f"\n{remaining_l} leaked clusters were found on the image.\n"
                     "This means waste of disk space, but no harm to data.")
    if result.check_errors:
        lines.append(f"\n{result.check_errors} internal errors have occurred during the check.")
    total = result.total_clusters or 1
    alloc = result.allocated_clusters
    lines.append(f"{alloc}/{result.total_clusters} = {100.0 * alloc / total:.2f}% allocated, "
                 f"{100.0 * result.fragmented_clusters / max(alloc, 1):.2f}% fragmented, "
                 f"{100.0 * result.compressed_clusters / max(alloc, 1):.2f}% compressed clusters")
    lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines) + "\n"


def check_status(result: CheckResult) -> int:
    """qemu-img check's exit status: 0 clean, 2 corruptions, 3 leaks only, 1 not done."""
    if result.check_errors:
        return 1
    if result.corruptions - result.corruptions_fixed:
        return 2
    if result.leaks - result.leaks_fixed:
        return 3
    return 0
