"""The MSI-X table of a virtio-pci function (PCI 3.0 6.8.2): masks, messages,
change notifications, and hostile table accesses."""

from __future__ import annotations

from dvmm_core.virtio_pci.msix import (
    ENTRY_SIZE,
    MSIX_ENABLE,
    MSIX_FUNCTION_MASK,
    MsiMessage,
    MsixTable,
)
from hypothesis import given, settings
from hypothesis import strategies as st

ADDR_LO, ADDR_HI, DATA, CTL = 0, 4, 8, 12


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def program(t: MsixTable, vector: int, lo: int, hi: int, data: int, masked: bool) -> None:
    base = vector * ENTRY_SIZE
    t.write_table(base + ADDR_LO, 4, lo)
    t.write_table(base + ADDR_HI, 4, hi)
    t.write_table(base + DATA, 4, data)
    t.write_table(base + CTL, 4, int(masked))


def live_table(vectors: int = 3) -> tuple[MsixTable, Counter]:
    changes = Counter()
    t = MsixTable(vectors, changes)
    t.set_control(MSIX_ENABLE)
    for v in range(vectors):
        program(t, v, 0xFEE00000 | v << 12, 0, 0x4020 + v, masked=False)
    changes.n = 0
    return t, changes


def test_entries_start_masked_and_zeroed() -> None:
    t = MsixTable(4, Counter())
    assert t.table_bytes == 4 * ENTRY_SIZE
    for v in range(4):
        assert t.read_table(v * ENTRY_SIZE + CTL, 4) == 1
        assert t.read_table(v * ENTRY_SIZE, 8) == 0
        assert t.read_table(v * ENTRY_SIZE + DATA, 4) == 0
    assert not t.enabled and not t.function_masked


def test_message_of_an_enabled_unmasked_vector() -> None:
    t, _ = live_table()
    assert t.message(1) == MsiMessage(0xFEE01000, 0, 0x4021)
    assert t.read_table(ENTRY_SIZE + DATA, 4) == 0x4021


def test_no_message_while_msix_is_disabled() -> None:
    t, _ = live_table()
    t.set_control(0)
    assert [t.message(v) for v in range(3)] == [None] * 3


def test_no_message_while_the_function_is_masked() -> None:
    t, _ = live_table()
    t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    assert [t.message(v) for v in range(3)] == [None] * 3
    t.set_control(MSIX_ENABLE)
    assert t.message(0) is not None


def test_no_message_for_a_masked_vector() -> None:
    t, _ = live_table()
    t.write_table(2 * ENTRY_SIZE + CTL, 4, 1)
    assert t.message(2) is None
    assert t.message(1) is not None
    # Other bits of vector control are reserved: only bit 0 masks.
    t.write_table(2 * ENTRY_SIZE + CTL, 4, 0xFFFFFFFE)
    assert t.message(2) is not None


def test_no_message_for_vectors_out_of_range() -> None:
    t, _ = live_table(vectors=3)
    for v in (-1, 3, 0xFFFF, 1 << 40):
        assert t.message(v) is None


def test_on_change_fires_for_real_table_changes_only() -> None:
    t, changes = live_table()
    t.write_table(DATA, 4, 0x4020)  # same value
    t.write_table(CTL, 1, 0)
    assert changes.n == 0
    t.write_table(DATA, 4, 0x4030)
    assert changes.n == 1
    t.write_table(CTL, 4, 1)
    assert changes.n == 2


def test_on_change_fires_for_real_control_changes_only() -> None:
    changes = Counter()
    t = MsixTable(2, changes)
    t.set_control(0)
    assert changes.n == 0
    t.set_control(MSIX_ENABLE)
    t.set_control(MSIX_ENABLE | 0x7FF)  # table size bits are not control bits
    assert changes.n == 1
    t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    assert changes.n == 2
    t.set_control(0)
    assert changes.n == 3 and not t.enabled


def test_an_8_byte_write_sets_the_whole_address() -> None:
    t, _ = live_table()
    t.write_table(0, 8, 0x1_FEE0_3000)
    assert t.message(0) == MsiMessage(0xFEE03000, 1, 0x4020)


def test_hostile_table_accesses_are_ignored() -> None:
    t, changes = live_table(vectors=2)
    before = [t.read_table(i * 4, 4) for i in range(2 * ENTRY_SIZE // 4)]
    outside = ((-4, 4), (2 * ENTRY_SIZE, 4), (2 * ENTRY_SIZE - 2, 4), (1 << 40, 8))
    for offset, size in (*outside, (0, 3), (0, 16), (0, 0), (4, -4)):
        t.write_table(offset, size, (1 << 128) - 1)
    for offset, size in outside:
        assert t.read_table(offset, size) == 0
    assert [t.read_table(i * 4, 4) for i in range(2 * ENTRY_SIZE // 4)] == before
    assert changes.n == 0


def test_pba_reads_zero() -> None:
    t, _ = live_table()
    t.write_table(CTL, 4, 1)
    assert t.read_pba(0, 8) == 0


def test_reset_masks_everything_again() -> None:
    t, changes = live_table()
    t.reset()
    assert not t.enabled
    assert t.read_table(CTL, 4) == 1
    t.set_control(MSIX_ENABLE)
    assert t.message(0) is None
    t.write_table(CTL, 4, 0)
    assert changes.n == 2  # the callback survives a reset


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-64, 128), st.integers(0, 9),
                          st.integers(0, (1 << 64) - 1)), max_size=30))
def test_random_table_writes_never_raise_or_spill(writes: list[tuple[int, int, int]]) -> None:
    t = MsixTable(3, Counter())
    t.set_control(MSIX_ENABLE)
    for offset, size, value in writes:
        t.write_table(offset, size, value)
        assert t.table_bytes == 3 * ENTRY_SIZE
        assert 0 <= t.read_table(offset, size) < 1 << 8 * size
        for v in range(3):
            msg = t.message(v)
            masked = t.read_table(v * ENTRY_SIZE + CTL, 4) & 1
            assert (msg is None) == bool(masked)
