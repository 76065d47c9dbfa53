"""The human monitor: QEMU-style text commands over the same VM operations.

Owns the command lines of ``human-monitor-command`` and of the serial
console's monitor prompt (``Ctrl-A c``, :mod:`dvmm_core.console`): ``info
status|registers|pci|backends|cpus|block``, ``stop``, ``cont``,
``system_reset``, ``system_powerdown``, ``quit`` and ``help``.  Every line
gets text back, as QEMU's HMP does -- an unknown command or a failure is
text too (``Error: ...``), never a QMP error.  Output uses QEMU's wording
where scripts commonly match it (``VM status: running``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import QmpError

if TYPE_CHECKING:
    from .commands import VmApi

HELP = """\
info status     -- the VM's run state
info registers  -- the vCPUs' registers
info pci        -- the PCI devices
info backends   -- the device backend processes (state, restarts, RSS, CPU)
info cpus       -- the vCPUs and their threads
info block      -- the disks
stop            -- stop every vCPU
cont            -- resume the vCPUs
system_reset    -- reset the machine
system_powerdown -- press the ACPI power button (this machine has none)
quit            -- stop the VM and its backends
help            -- this list
"""


class Hmp:
    """Runs one HMP command line against a :class:`VmApi`."""

    def __init__(self, vm: VmApi) -> None:
        self.vm = vm

    def run(self, line: str, cpu: int | None = None) -> str:
        words = line.split()
        if not words:
            return ""
        try:
            return self._run(words, cpu)
        except QmpError as exc:
            return f"Error: {exc.desc}\n"

    def _run(self, words: list[str], cpu: int | None) -> str:
        verb, rest = words[0], words[1:]
        actions = {"stop": self.vm.stop, "cont": self.vm.cont, "c": self.vm.cont,
                   "system_reset": self.vm.system_reset, "quit": self.vm.quit, "q": self.vm.quit,
                   "system_powerdown": self.vm.system_powerdown}
        if verb in actions and not rest:
            actions[verb]()
            return ""
        if verb in ("help", "?"):
            return HELP
        if verb == "info" and len(rest) == 1:
            return self._info(rest[0], cpu)
        if verb == "info":
            return "info: give one of status, registers, pci, backends, cpus, block\n"
        return f"unknown command: '{_printable(' '.join(words))}' (try help)\n"

    def _info(self, what: str, cpu: int | None) -> str:
        if what == "status":
            status = self.vm.status()
            return f"VM status: {status}\n"
        if what == "registers":
            return self.vm.registers(cpu)
        if what == "pci":
            return format_pci(self.vm.pci())
        if what == "backends":
            return format_backends(self.vm.backends())
        if what == "cpus":
            return "".join(f"{'*' if c['cpu-index'] == 0 else ' '} CPU #{c['cpu-index']}: "
                           f"thread_id={c.get('thread-id')}\n" for c in self.vm.cpus())
        if what == "block":
            return "".join(f"{b['device']}: {b['inserted']['file']} "
                           f"({'read-only' if b['inserted']['ro'] else 'read-write'})\n"
                           for b in self.vm.block()) or "(no disks)\n"
        return f"info: unknown item '{_printable(what)}' (try help)\n"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:80])


_CLASS_NAMES = {0x0600: "Host bridge", 0x0601: "ISA bridge", 0x0100: "SCSI controller",
                0x0200: "Ethernet controller", 0x0380: "Display controller",
                0x0300: "VGA controller", 0x0780: "Communication controller"}


def format_pci(devices: list[dict[str, Any]]) -> str:
    """``info pci`` in QEMU's layout (hw/pci/pci-hmp-cmds.c)."""
    lines = []
    for d in devices:
        ids, cls = d["id"], d["class_info"]["class"]
        lines.append(f"  Bus {d['bus']:2d}, device {d['slot']:3d}, function {d['function']}:")
        name = d["class_info"].get("desc") or _CLASS_NAMES.get(cls, f"Class {cls:04x}")
        lines.append(f"    {name}: PCI device {ids['vendor']:04x}:{ids['device']:04x}")
        if d.get("irq_pin"):
            lines.append(f"      IRQ {d.get('irq', 0)}, pin {chr(ord('A') + d['irq_pin'] - 1)}")
        for r in d.get("regions", []):
            kind = "I/O" if r["type"] == "io" else ("64 bit memory" if r.get("mem_type_64")
                                                    else "32 bit memory")
            addr = r["address"]
            where = "not mapped" if addr < 0 else f"at {addr:#x} [{addr + r['size'] - 1:#x}]"
            lines.append(f"      BAR{r['bar']}: {kind} {where}.")
        lines.append(f"      id \"{d.get('qdev_id', '')}\"")
    return "\n".join(lines) + "\n" if lines else "(no PCI devices)\n"


def format_backends(backends: list[dict[str, Any]]) -> str:
    if not backends:
        return "(no backends)\n"
    rows = [("NAME", "PID", "STATE", "RESTARTS", "RSS", "CPU")]
    for b in backends:
        rss = b.get("rss")
        cpu = b.get("cpu-seconds")
        rows.append((str(b.get("name")), str(b.get("pid") or "-"), str(b.get("state")),
                     str(b.get("restarts")), f"{rss / 1048576:.1f}M" if rss else "-",
                     f"{cpu:.2f}s" if isinstance(cpu, int | float) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in rows)
