"""Damage: which rectangles changed between two frames.

Owns the tile compare behind incremental updates (RFC 6143 7.5.3: an
incremental FramebufferUpdateRequest wants only what changed since the last
update the client received).  The screen is cut into TILE x TILE tiles
(the ZRLE tile size, so a damaged tile is exactly one ZRLE tile); a tile is
damaged when any of its bytes differ from the frame last sent to that
client.  Damaged tiles of one tile row merge into horizontal runs.

Rows are compared whole first (one C-level bytes compare), so an unchanged
screen costs one compare per row, and only rows that differ are split into
tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from .framebuffer import Frame

TILE = 64


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    def clip(self, other: Rect) -> Rect | None:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        return Rect(x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def full(frame: Frame) -> Rect:
    return Rect(0, 0, frame.width, frame.height)


def damaged(prev: Frame | None, cur: Frame, area: Rect | None = None) -> list[Rect]:
    """The rectangles of ``cur`` (inside ``area``) that differ from ``prev``.

    A missing previous frame, or one of another size, damages everything."""
    whole = full(cur)
    area = whole if area is None else area.clip(whole)
    if area is None:
        return []
    if prev is None or (prev.width, prev.height) != (cur.width, cur.height):
        return [area]
    if prev.pixels is cur.pixels or prev.pixels == cur.pixels:
        return []
    rects: list[Rect] = []
    for band in range(area.y - area.y % TILE, area.y + area.height, TILE):
        rects.extend(_band(prev, cur, area, band))
    return rects


def _band(prev: Frame, cur: Frame, area: Rect, band: int) -> list[Rect]:
    """Damaged runs of tiles in one tile row (clipped to ``area``)."""
    stride = cur.width * 4
    y0, y1 = max(band, area.y), min(band + TILE, area.y + area.height)
    x_lo = area.x - area.x % TILE
    columns = range(x_lo, area.x + area.width, TILE)
    dirty: set[int] = set()
    a, b = prev.pixels, cur.pixels
    for y in range(y0, y1):
        o = y * stride
        if a[o + area.x * 4:o + (area.x + area.width) * 4] == \
                b[o + area.x * 4:o + (area.x + area.width) * 4]:
            continue
        for tx in columns:
            if tx in dirty:
                continue
            s, e = o + max(tx, area.x) * 4, o + min(tx + TILE, area.x + area.width) * 4
            if a[s:e] != b[s:e]:
                dirty.add(tx)
        if len(dirty) == len(columns):
            break
    return _runs(sorted(dirty), area, y0, y1)


def _runs(columns: list[int], area: Rect, y0: int, y1: int) -> list[Rect]:
    rects: list[Rect] = []
    start = prev = None
    for tx in [*columns, None]:
        if tx is not None and prev is not None and tx == prev + TILE:
            prev = tx
            continue
        if start is not None and prev is not None:
            x0 = max(start, area.x)
            x1 = min(prev + TILE, area.x + area.width)
            rects.append(Rect(x0, y0, x1 - x0, y1 - y0))
        start = prev = tx
    return rects
