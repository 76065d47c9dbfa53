"""Notification suppression (virtio 1.2 2.7.7, 2.7.10): EVENT_IDX and the ring flags.

The device decides whether to interrupt from ``used_event`` (EVENT_IDX) or
the NO_INTERRUPT flag, and asks for kicks through ``avail_event`` or the
NO_NOTIFY flag; the driver side here is :class:`DriverQueue`.
"""

from __future__ import annotations

from dvmm_shared.driver import Buf
from dvmm_shared.virtio import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
from dvmm_shared.virtqueue import vring_need_event
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import RingPair, ring_pair

u16 = st.integers(0, 0xFFFF)


def reference_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Notify iff the driver's event index is one of the entries just published."""
    return any((old_idx + k) & 0xFFFF == event_idx for k in range((new_idx - old_idx) & 0xFFFF))


def spec_formula(event_idx: int, new_idx: int, old_idx: int) -> bool:
    # 2.7.10 / Linux vring_need_event: (u16)(new - event - 1) < (u16)(new - old)
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@settings(max_examples=500, deadline=None)
@given(event=u16, old=u16, delta=st.integers(0, 600))
def test_vring_need_event_matches_the_spec(event: int, old: int, delta: int) -> None:
    new = (old + delta) & 0xFFFF
    got = vring_need_event(event, new, old)
    assert got == spec_formula(event, new, old) == reference_need_event(event, new, old)


def test_vring_need_event_examples() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)  # the driver wants to hear about entry 1, not 0
    assert vring_need_event(5, 10, 3) and not vring_need_event(10, 10, 3)
    assert not vring_need_event(2, 10, 3)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the 16-bit wrap
    assert vring_need_event(0, 1, 0xFFFE)
    assert not vring_need_event(1, 1, 0xFFFE)
    assert not vring_need_event(7, 7, 7)  # nothing new: never


def complete_one(rp: RingPair) -> int:
    head = rp.driver.add([Buf(rp.alloc(8), 8, write=True)])
    chain = rp.device.pop()
    assert chain is not None and chain.head == head
    rp.device.push(head, 8)
    return head


# -- interrupts (device -> driver) --------------------------------------------
def test_event_idx_interrupts_follow_used_event() -> None:
    rp = ring_pair(event_idx=True)
    complete_one(rp)
    assert rp.device.needs_notification()  # nothing signalled yet: always
    assert len(rp.driver.get_used()) == 1  # the driver sets used_event = 1
    complete_one(rp)
    assert rp.device.needs_notification()  # used 1 -> 2 crosses used_event 1
    complete_one(rp)  # the driver has not reaped: used_event still 1
    assert not rp.device.needs_notification()
    complete_one(rp)
    assert not rp.device.needs_notification()
    assert len(rp.driver.get_used()) == 3  # used_event = 4
    complete_one(rp)
    assert rp.device.needs_notification()


def test_event_idx_batched_completions_notify_once() -> None:
    rp = ring_pair(event_idx=True)
    complete_one(rp)
    assert rp.device.needs_notification()
    rp.driver.get_used()
    rp.driver.set_used_event(3)  # "wake me when entry 3 is used"
    complete_one(rp)  # used idx 2
    assert not rp.device.needs_notification()
    complete_one(rp)
    complete_one(rp)  # used idx 4: entry 3 now published
    assert rp.device.needs_notification()
    assert not rp.device.needs_notification()  # nothing new since


def test_event_idx_first_completion_always_notifies() -> None:
    # Nothing signalled yet (fresh queue, or a restarted backend): the device
    # cannot know what the driver saw, so it interrupts once regardless.
    rp = ring_pair(event_idx=True)
    rp.driver.set_used_event(5)
    complete_one(rp)
    assert rp.device.needs_notification()
    complete_one(rp)
    assert not rp.device.needs_notification()  # now used_event 5 is honoured


def test_event_idx_ignores_the_no_interrupt_flag() -> None:
    rp = ring_pair(event_idx=True)
    rp.driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    complete_one(rp)
    assert rp.device.needs_notification()


def test_no_interrupt_flag_without_event_idx() -> None:
    rp = ring_pair()
    complete_one(rp)
    assert rp.device.needs_notification()
    rp.driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    complete_one(rp)
    assert not rp.device.needs_notification()
    rp.driver.set_avail_flags(0)
    complete_one(rp)
    assert rp.device.needs_notification()


# -- kicks (driver -> device) ---------------------------------------------------
def test_enable_notification_reports_chains_that_arrived() -> None:
    for event_idx in (False, True):
        rp = ring_pair(event_idx=event_idx)
        assert not rp.device.enable_notification()  # empty ring
        rp.driver.add([Buf(rp.alloc(4), 4)])
        assert rp.device.enable_notification()  # a chain came in meanwhile
        assert rp.device.pop() is not None
        assert not rp.device.enable_notification()


def test_event_idx_enable_notification_publishes_avail_event() -> None:
    rp = ring_pair(event_idx=True)
    assert rp.driver.avail_event() == 0
    for _ in range(3):
        rp.driver.add([Buf(rp.alloc(4), 4)])
    while rp.device.pop() is not None:
        pass
    assert not rp.device.enable_notification()
    assert rp.driver.avail_event() == rp.device.last_avail_idx == 3


def test_event_idx_driver_kicks_only_when_the_device_asked() -> None:
    rp = ring_pair(event_idx=True)
    rp.driver.add([Buf(rp.alloc(4), 4)])
    assert rp.driver.should_kick()  # avail_event 0 is crossed by 0 -> 1
    rp.device.pop()
    assert not rp.device.enable_notification()  # avail_event = 1
    rp.driver.add([Buf(rp.alloc(4), 4)])
    assert rp.driver.should_kick()  # entry 1 published
    rp.driver.add([Buf(rp.alloc(4), 4)])
    assert not rp.driver.should_kick()  # the device has not re-armed yet
    assert rp.device.pending() == 2


def test_disable_notification_sets_no_notify_and_enable_clears_it() -> None:
    rp = ring_pair()
    rp.device.disable_notification()
    assert rp.driver.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    rp.driver.add([Buf(rp.alloc(4), 4)])
    assert not rp.driver.should_kick()
    assert rp.device.enable_notification()  # and the chain is seen anyway
    assert rp.driver.used_flags() == 0
    rp.driver.add([Buf(rp.alloc(4), 4)])
    assert rp.driver.should_kick()


def test_disable_notification_is_a_no_op_under_event_idx() -> None:
    rp = ring_pair(event_idx=True)
    rp.device.disable_notification()
    assert rp.driver.used_flags() == 0
