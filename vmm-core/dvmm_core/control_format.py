"""Human text for the control plane's maps: one event per line, the status table.

Pure: maps in, strings out (``dvmm events`` and ``dvmm status`` print them;
:mod:`.control_cli` does the talking).  Every value came over a socket, so
nothing here assumes a field is present or has the expected type.
"""

from __future__ import annotations

import json
import time
from typing import Any

EVENT_KEYS = ("event", "seq", "ts")
COLUMNS = ("NAME", "PID", "STATE", "LINK", "RESTARTS", "UPTIME", "RSS", "CPU", "I/O",
           "POLICY")


def format_event(event: dict[str, Any]) -> str:
    """``HH:MM:SS.mmm #seq event key=value ...`` (local time)."""
    ts = event.get("ts")
    clock = "??:??:??.???"
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        try:
            clock = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
        except (OverflowError, OSError, ValueError):
            pass
    fields = " ".join(f"{k}={format_value(v)}" for k, v in event.items() if k not in EVENT_KEYS)
    line = f"{clock} #{event.get('seq', '?')} {event.get('event', '?')}"
    return f"{line} {fields}" if fields else line


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value if value and not any(c.isspace() or c in "\"'=" for c in value) \
            else json.dumps(value)
    if isinstance(value, bytes):
        return value.hex() or '""'
    return json.dumps(value, default=repr, separators=(",", ":"))


def human_bytes(n: Any) -> str:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "-"
    size = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "" else f"{size:.1f}{unit}"
        size /= 1024
    return "-"  # pragma: no cover - the loop always returns


def human_seconds(s: Any) -> str:
    if not isinstance(s, int | float) or isinstance(s, bool) or s < 0:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def io_summary(stats: Any) -> str:
    """The backend's I/O counters in a few words ("-" when it did not answer)."""
    if not isinstance(stats, dict):
        return "-"
    dev = stats.get("device")
    if isinstance(dev, dict) and "bytes_read" in dev:  # blk
        return (f"r {dev.get('reads', 0)}/{human_bytes(dev.get('bytes_read'))} "
                f"w {dev.get('writes', 0)}/{human_bytes(dev.get('bytes_written'))} "
                f"fl {dev.get('flushes', 0)} err {dev.get('errors', 0)}")
    if isinstance(dev, dict) and isinstance(dev.get("pairs"), list):  # net
        pairs = [p for p in dev["pairs"] if isinstance(p, dict)]

        def total(key: str) -> int:
            return sum(v for p in pairs if isinstance(v := p.get(key, 0), int))

        return (f"rx {total('rx_frames')}/{human_bytes(total('rx_bytes'))} "
                f"tx {total('tx_frames')}/{human_bytes(total('tx_bytes'))}")
    queues = stats.get("queues")
    if isinstance(queues, list):
        return f"req {sum(q.get('requests', 0) for q in queues if isinstance(q, dict))}"
    return "-"


def _cpu(b: dict[str, Any]) -> str:
    cpu_s, pct = b.get("cpu_s"), b.get("cpu_percent")
    if not isinstance(cpu_s, int | float):
        return "-"
    return f"{cpu_s:.2f}s {pct:.0f}%" if isinstance(pct, int | float) else f"{cpu_s:.2f}s"


def backend_row(b: dict[str, Any]) -> tuple[str, ...]:
    policy = str(b.get("policy") or "-")
    if b.get("external") and policy != "external":
        policy += " (external)"
    return (str(b.get("name", "?")), str(b.get("pid") or "-"), str(b.get("state", "?")),
            str(b.get("link") or "-"), str(b.get("restarts", "-")),
            human_seconds(b.get("uptime")), human_bytes(b.get("rss")), _cpu(b),
            io_summary(b.get("stats")), policy)


def status_table(report: dict[str, Any]) -> str:
    """The VM line, a table of backends, then why any backend exited or was given up."""
    vm = report.get("vm") if isinstance(report.get("vm"), dict) else {}
    assert isinstance(vm, dict)
    lines = [f"VM pid {vm.get('pid', '?')}  state {vm.get('state', '?')}  "
             f"up {human_seconds(vm.get('uptime'))}  runtime {report.get('runtime_dir', '?')}"]
    backends = [b for b in report.get("backends", []) if isinstance(b, dict)]
    rows = [COLUMNS, *(backend_row(b) for b in backends)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    for b in backends:
        if b.get("given_up_reason"):
            lines.append(f"{b.get('name')}: given up: {b['given_up_reason']}")
        elif b.get("last_exit"):
            lines.append(f"{b.get('name')}: last exit: {b['last_exit']}")
    if not backends:
        lines.append("(no backends)")
    return "\n".join(lines)
