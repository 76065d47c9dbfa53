"""Crash recovery of virtio-gpu: the table saved after every change, restored
by the next process.

Owns the link between the :class:`ResourceTable` and its saved description
(:mod:`.gpu_state`): :func:`capture` after each request that changed the
table (create, unref, attach, detach, set scanout, update cursor -- not
transfers and flushes, which only move pixels), :func:`restore` in a new
process: the resources are created again, their backing attached, their
pixels transferred back from those guest pages, and the scanouts and cursor
set, all through the table's own checked commands (the saved state is
hostile input), so the VNC clients see the same screen without the guest
doing anything.

:class:`Recovery` is what :class:`GpuDevice` holds: the store once the
frontend handed over the in-flight memfd (none without INFLIGHT_SHMFD:
then nothing survives the process), a state waiting for guest memory (a
frontend may send the region before its memory table; the restore runs when
the first ring starts), and the marker of the last applied request.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

from .gpu_protocol import GpuError, Rect
from .gpu_state import GpuState, Marker, ResourceState, ScanoutState, StateError, StateStore
from .resources import ResourceTable

log = logging.getLogger("dvmm.display")


def capture(table: ResourceTable, marker: Marker | None) -> GpuState:
    return GpuState(
        resources=tuple(ResourceState(r.resource_id, int(r.format), r.width, r.height, r.backing)
                        for r in table.resources.values()),
        scanouts=tuple(ScanoutState(s.width, s.height, s.resource_id, s.rect)
                       for s in table.scanouts),
        cursor_resource=table.cursor_resource, cursor_scanout=table.cursor_scanout,
        cursor_pos=table.cursor_pos, cursor_hot=table.cursor_hot, marker=marker)


@dataclass
class RestoreReport:
    resources: int = 0
    failed: int = 0
    scanouts: int = 0


def restore(table: ResourceTable, state: GpuState) -> RestoreReport:
    """Rebuild ``table`` (emptied first) from ``state``; what could not be
    restored is logged and skipped."""
    table.reset()
    report = RestoreReport()
    for r in state.resources:
        try:
            table.create_2d(r.resource_id, r.format, r.width, r.height)
            if r.backing:
                table.attach_backing(r.resource_id, r.backing)
                table.transfer_to_host_2d(r.resource_id, Rect(0, 0, r.width, r.height), 0)
            report.resources += 1
        except GpuError as exc:
            report.failed += 1
            log.warning("resource %d not restored: %s", r.resource_id, exc)
    for i, s in enumerate(state.scanouts[:len(table.scanouts)]):
        _restore_scanout(table, i, s, report)
    if state.cursor_resource:
        try:
            table.update_cursor(state.cursor_scanout, *state.cursor_pos, state.cursor_resource,
                                *state.cursor_hot)
        except GpuError as exc:
            log.warning("cursor not restored: %s", exc)
    return report


def _restore_scanout(table: ResourceTable, index: int, s: ScanoutState,
                     report: RestoreReport) -> None:
    scanout = table.scanouts[index]
    if 1 <= s.width <= 8192 and 1 <= s.height <= 8192:
        scanout.width, scanout.height = s.width, s.height
    if not s.resource_id:
        return
    try:
        table.set_scanout(index, s.resource_id, s.rect)
        report.scanouts += 1
    except GpuError as exc:
        log.warning("scanout %d not restored: %s", index, exc)


def request_crc(data: bytes) -> int:
    return zlib.crc32(data)


class Recovery:
    """The device's saved state, if the frontend keeps one for it."""

    def __init__(self, table: ResourceTable) -> None:
        self.table = table
        self.store: StateStore | None = None
        self.pending: GpuState | None = None  # to restore when guest memory is there
        #: The request a crash may have left applied but unanswered.
        self.replay: Marker | None = None
        self.last: Marker | None = None  # the marker of the newest save
        self.restores = 0
        self.save_errors = 0

    def attach(self, fd: int, offset: int, fresh: bool) -> None:
        """The in-flight memfd's state piece (see VhostUserBackend.state_region)."""
        try:
            store = StateStore.map(fd, offset)
        except StateError as exc:
            log.warning("no crash recovery for the gpu state: %s", exc)
            return
        self.store, self.replay, self.last = store, None, None
        if fresh:
            store.clear()
            self.table.reset()
            self.pending = None
            return
        self.pending = store.load()
        if self.pending is None:
            log.warning("the previous process left no readable gpu state")

    def ring_started(self) -> None:
        """Guest memory is mapped now: apply a state waiting for it."""
        state, self.pending = self.pending, None
        if state is None:
            return
        report = restore(self.table, state)
        self.restores += 1
        self.replay = self.last = state.marker
        log.info("gpu state restored: %d resources (%d failed), %d scanouts",
                 report.resources, report.failed, report.scanouts)

    def is_replay(self, queue: int, head: int, data: bytes) -> bool:
        """Whether this request is the one applied just before the crash (its
        answer was lost with the process; the in-flight region hands it out
        again).  Only the first request served after a restore can be."""
        marker = self.replay
        if marker is None or marker.queue != queue:
            return False
        self.replay = None
        return marker == Marker(queue, head, request_crc(data))

    def changed(self, queue: int, head: int, data: bytes) -> None:
        """A request changed the table: save it (before the answer is pushed)."""
        self.last = Marker(queue, head, request_crc(data))
        self.save()

    def save(self) -> None:
        """Save the table as it is (also for changes no request made: a new
        display size), keeping the last request's marker."""
        if self.store is None:
            return
        try:
            self.store.save(capture(self.table, self.last))
        except StateError as exc:
            self.save_errors += 1
            self.store.clear()  # better nothing than an older table after a restart
            log.warning("gpu state not saved (a restart would lose it): %s", exc)

    def detach(self) -> None:
        """The frontend left: its memfd is no longer ours to write."""
        self.store, self.pending, self.replay = None, None, None
