"""Random interleavings of completions through the blk dispatcher (hypothesis).

The real device, dispatcher, ring walking and in-flight region; an engine
whose jobs finish in the order hypothesis picks (:class:`ManualEngine`), with
the guest posting reads, writes (some failing), flushes, GET_IDs and bad
requests in between.  After every step:

* every used entry is a chain that was posted and not completed before
  (exactly once), with the status and length its request calls for;
* the in-flight region marks exactly the chains the device holds: an entry
  is cleared only once its used entry is published;
* a FLUSH reached the disk only after every write posted before it had, and
  its used entry comes after theirs;
* a read returns what the writes posted before it left there, whatever
  was posted after it (overlapping requests keep their order).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .blk_engine_rig import SECTOR, EngineRig, Posted

OK, IOERR, UNSUPP = 0, 1, 2
FAILING = frozenset({3})  # writes to this sector fail with EIO

kinds = st.sampled_from("RRWWWFGX")
steps = st.lists(st.tuples(st.sampled_from(["post", "post", "post", "run", "run", "reap",
                                            "kick"]),
                           st.integers(0, 63), kinds), min_size=4, max_size=80)


class Checker:
    def __init__(self, rig: EngineRig) -> None:
        self.rig = rig
        self.order: list[Posted] = []  # in the order the guest posted them
        self.used: list[Posted] = []  # in used-ring order (heads are reused)
        self.outstanding: dict[int, Posted] = {}  # by head
        self.written: set[int] = set()  # sectors a write posted so far changes
        self.expect: dict[int, bytes] = {}  # by id(read): what it must return

    def post(self, kind: str, sector: int) -> None:
        p = self.rig.post(kind, sector)
        self.order.append(p)
        self.outstanding[p.head] = p
        if kind == "W" and sector not in FAILING:
            self.written.add(sector)
        elif kind == "R":
            self.expect[id(p)] = bytes([0xA0 + sector % 16] if sector in self.written
                                       else [sector & 0xFF]) * SECTOR

    def reap_used(self) -> None:
        rig = self.rig
        for head, written in rig.rp.driver.get_used():
            p = self.outstanding.pop(head, None)
            assert p is not None, f"head {head} completed twice or never posted"
            self.used.append(p)
            self._check_answer(p, rig.status(p), written)

    def _check_answer(self, p: Posted, status: int, written: int) -> None:
        if p.kind == "X":
            assert (status, written) == (UNSUPP, 1)
        elif p.kind == "W" and p.sector in FAILING:
            assert (status, written) == (IOERR, 1)
        else:
            assert status == OK
            assert written == {"R": SECTOR + 1, "W": 1, "F": 1, "G": 21}[p.kind]
        if p.kind == "R":
            assert self.rig.rp.mem.read(p.data, SECTOR) == self.expect[id(p)]

    def check_inflight(self) -> None:
        rig = self.rig
        marked = set(rig.tracker.inflight_heads())
        # Published but not yet reaped by the driver is not in flight any more.
        assert marked == rig.in_flight_jobs()
        assert rig.tracker.used_idx == rig.rp.device.used_idx

    def check_flushes(self) -> None:
        """Each flush the disk saw covered every write posted before it."""
        rig = self.rig
        flushes = [p for p in self.order if p.kind == "F"]
        seen = [c for c in rig.disk.calls if c[0] == "flush"]
        position = {id(q): i for i, q in enumerate(self.used)}
        # Flushes reach the disk in the order they were posted (each waits for
        # a superset of the writes the one before it waited for).
        for p, (_, written_then) in zip(flushes, seen, strict=False):
            earlier = [q for q in self.order[:self.order.index(p)] if q.kind == "W"]
            ok_writes = {q.sector for q in earlier if q.sector not in FAILING}
            assert ok_writes <= written_then  # type: ignore[operator]
            if id(p) in position:
                for q in earlier:
                    assert id(q) in position and position[id(q)] < position[id(p)]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.sampled_from(["engine", "inline", "memory"]))
def test_random_completion_orders(plan: list[tuple[str, int, str]], mode: str) -> None:
    """``mode``: every request with I/O through the engine, or the default
    (what needs no device is served inline), or a tmpfs-like image (whole
    passes inline whenever nothing is in flight)."""
    rig = EngineRig(ring_size=64, fail=FAILING, memory_backed=mode == "memory",
                    inline=mode != "engine")
    check = Checker(rig)
    posted = 0
    for action, n, kind in plan:
        if action == "post" and posted < 40 and rig.rp.driver.free_descriptors >= 3:
            check.post(kind, n % 4)  # few sectors: requests overlap often
            posted += 1
        elif action == "kick":
            rig.service()
        elif action == "run" and rig.engine.queued:
            rig.engine.run(n % len(rig.engine.queued))
        elif action == "reap":
            assert rig.device.dispatcher is not None
            rig.device.dispatcher.on_ready()
        check.reap_used()
        check.check_inflight()
        check.check_flushes()
    # The ring stops: everything taken comes back, exactly once.
    rig.service()
    rig.device.queue_stopped(0)
    check.reap_used()
    check.check_inflight()
    check.check_flushes()
    assert not check.outstanding
    assert rig.tracker.inflight_heads() == []
    assert sorted(map(id, check.used)) == sorted(map(id, check.order))
