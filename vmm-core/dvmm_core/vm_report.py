"""A VM's backends as one report, gathered over the control plane.

Owns asking a VM (by its runtime directory) what ``dvmm status`` asks --
the core's ``status`` on ``core.ctl``, each backend's ``stats`` on its own
endpoint -- plus each backend process's RSS and CPU time (psutil), and
shaping it for QMP's ``x-dvmm-query-backends`` and ``dvmm top``.  Process
faults go the same way (the core's ``fault`` command), so QMP's
``x-dvmm-backend-kill`` is exactly ``dvmm fault NAME kill``.

:class:`UsageSampler` keeps psutil's process objects between calls, so CPU
percentages are measured over the interval between two reports (what a
live view refreshing every second wants) without sleeping.
"""

from __future__ import annotations

from typing import Any

STATS_TIMEOUT = 1.0
STATUS_TIMEOUT = 10.0


class ReportError(Exception):
    """The VM or a backend did not answer (one line)."""


def ask(endpoint: str, cmd: str, timeout: float = STATUS_TIMEOUT, **args: Any) -> dict[str, Any]:
    from dvmm_shared.control import ControlError, command

    try:
        return command(endpoint, cmd, timeout=timeout, **args)
    except ControlError as exc:
        raise ReportError(str(exc)) from None


def core_status(runtime_dir: str) -> dict[str, Any]:
    from dvmm_shared.control import runtime_endpoint

    return ask(runtime_endpoint(runtime_dir, "core"), "status")


class UsageSampler:
    """RSS, CPU seconds and CPU % of processes by pid, across calls."""

    def __init__(self) -> None:
        self._procs: dict[int, Any] = {}

    def sample(self, pid: Any) -> dict[str, Any]:
        import psutil

        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return {}
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the interval
                percent = None
            else:
                percent = proc.cpu_percent(None)
            with proc.oneshot():
                times = proc.cpu_times()
                return {"rss": proc.memory_info().rss, "cpu-seconds": round(
                    times.user + times.system, 3), "cpu-percent": percent}
        except psutil.Error:
            self._procs.pop(pid, None)
            return {}


def backend_stats(backend: dict[str, Any]) -> dict[str, Any] | None:
    """A backend's own counters (None: it has no endpoint or did not answer)."""
    control = backend.get("control")
    if not isinstance(control, str) or not backend.get("pid"):
        return None
    try:
        stats = ask(control, "stats", timeout=STATS_TIMEOUT)
    except ReportError:
        return None
    stats.pop("ok", None)
    return stats


def shape_backend(b: dict[str, Any], usage: dict[str, Any],
                  stats: dict[str, Any] | None) -> dict[str, Any]:
    """One backend in QMP's style (dashes in names; every field present)."""
    return {"name": b.get("name"), "pid": b.get("pid"), "state": b.get("state"),
            "link": b.get("link"), "restarts": b.get("restarts", 0),
            "restores": b.get("restores", 0), "uptime": b.get("uptime"),
            "policy": b.get("policy"), "external": bool(b.get("external")),
            "rss": usage.get("rss"), "cpu-seconds": usage.get("cpu-seconds"),
            "cpu-percent": usage.get("cpu-percent"), "last-exit": b.get("last_exit"),
            "given-up-reason": b.get("given_up_reason"), "counters": stats}


def backend_report(runtime_dir: str, sampler: UsageSampler | None = None) -> list[dict[str, Any]]:
    """Every backend of the VM in ``runtime_dir``: state, restarts, RSS, CPU, counters."""
    sampler = sampler or UsageSampler()
    status = core_status(runtime_dir)
    backends = [b for b in status.get("backends", []) if isinstance(b, dict)]
    return [shape_backend(b, sampler.sample(b.get("pid")), backend_stats(b)) for b in backends]


def backend_fault(runtime_dir: str, name: str, action: str) -> dict[str, Any]:
    """A process fault (kill, stop, cont, restart) through the core's supervisor."""
    from dvmm_shared.control import runtime_endpoint

    reply = ask(runtime_endpoint(runtime_dir, "core"), "fault", name=name, action=action)
    reply.pop("ok", None)
    return reply
