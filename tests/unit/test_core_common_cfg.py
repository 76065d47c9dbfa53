"""virtio_pci_common_cfg (virtio 1.2 4.1.4.3) and the device status machine (3.1.1).

Driven the way a guest driver does it: accesses of 1, 2, 4 or 8 bytes at
register offsets, 64-bit values as two 32-bit halves.
"""

from __future__ import annotations

import copy

import pytest
from dvmm_core.virtio_pci.common_cfg import (
    SIZE,
    VIRTIO_MSI_NO_VECTOR,
    CommonConfig,
    DeviceState,
    QueueConfig,
    StatusEvent,
)
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from hypothesis import given, settings
from hypothesis import strategies as st

# Register offsets of struct virtio_pci_common_cfg.
DFSELECT, DF, GFSELECT, GF = 0x00, 0x04, 0x08, 0x0C
MSIX_CONFIG, NUM_QUEUES, STATUS, GENERATION = 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_DRIVER, Q_DEVICE, Q_NOTIFY_DATA, Q_RESET = 0x20, 0x28, 0x30, 0x38, 0x3A

ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
DEVICE_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(34) | bit(29) | bit(9) | bit(1)
MAX_SIZE = 256


def make(queues: int = 2) -> CommonConfig:
    return CommonConfig(DEVICE_FEATURES, [QueueConfig(MAX_SIZE) for _ in range(queues)])


def state(cfg: CommonConfig) -> DeviceState:
    """The state as of now (a call, so type checkers do not carry narrowing over)."""
    return cfg.state


def write_features(cfg: CommonConfig, features: int) -> None:
    for sel in (0, 1):
        cfg.write(GFSELECT, 4, sel)
        cfg.write(GF, 4, (features >> 32 * sel) & 0xFFFFFFFF)


def device_features(cfg: CommonConfig) -> int:
    value = 0
    for sel in (0, 1):
        cfg.write(DFSELECT, 4, sel)
        value |= cfg.read(DF, 4) << 32 * sel
    return value


def negotiate(cfg: CommonConfig, features: int = DEVICE_FEATURES) -> StatusEvent:
    """ACKNOWLEDGE, DRIVER, write the features, set FEATURES_OK."""
    assert cfg.write(STATUS, 1, ACK) is StatusEvent.NONE
    assert cfg.write(STATUS, 1, ACK | DRIVER) is StatusEvent.NONE
    write_features(cfg, features)
    return cfg.write(STATUS, 1, ACK | DRIVER | FEATURES_OK)


def write64(cfg: CommonConfig, offset: int, value: int) -> None:
    cfg.write(offset, 4, value & 0xFFFFFFFF)
    cfg.write(offset + 4, 4, value >> 32)


def read64(cfg: CommonConfig, offset: int) -> int:
    return cfg.read(offset, 4) | cfg.read(offset + 4, 4) << 32


def setup_queue(cfg: CommonConfig, index: int, size: int, base: int, enable: bool = True) -> None:
    cfg.write(Q_SELECT, 2, index)
    cfg.write(Q_SIZE, 2, size)
    cfg.write(Q_MSIX, 2, index + 1)
    write64(cfg, Q_DESC, base)
    write64(cfg, Q_DRIVER, base + 0x1000)
    write64(cfg, Q_DEVICE, base + 0x2000)
    if enable:
        cfg.write(Q_ENABLE, 2, 1)


# -- layout and feature windows ------------------------------------------------
def test_structure_is_0x3c_bytes_and_starts_from_reset_values() -> None:
    cfg = make(queues=3)
    assert SIZE == 0x3C
    assert cfg.read(NUM_QUEUES, 2) == 3
    assert cfg.read(STATUS, 1) == 0
    assert cfg.read(MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    assert cfg.read(Q_SIZE, 2) == MAX_SIZE  # queue_size reads the maximum at reset
    assert cfg.read(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    assert cfg.read(Q_ENABLE, 2) == 0
    assert cfg.state is DeviceState.RESET


def test_device_features_are_read_through_two_32_bit_windows() -> None:
    cfg = make()
    cfg.write(DFSELECT, 4, 0)
    assert cfg.read(DF, 4) == DEVICE_FEATURES & 0xFFFFFFFF
    cfg.write(DFSELECT, 4, 1)
    assert cfg.read(DF, 4) == DEVICE_FEATURES >> 32
    assert cfg.read(DFSELECT, 4) == 1
    cfg.write(DFSELECT, 4, 2)  # no such window: reads 0
    assert cfg.read(DF, 4) == 0
    assert device_features(cfg) == DEVICE_FEATURES


def test_device_features_are_read_only() -> None:
    cfg = make()
    cfg.write(DF, 4, 0xFFFFFFFF)
    assert device_features(cfg) == DEVICE_FEATURES


def test_driver_features_are_assembled_from_two_halves_and_read_back() -> None:
    cfg = make()
    cfg.write(STATUS, 1, ACK | DRIVER)
    wanted = bit(VIRTIO_F_VERSION_1) | bit(9)
    write_features(cfg, wanted)
    assert cfg.driver_features == wanted
    cfg.write(GFSELECT, 4, 0)
    assert cfg.read(GF, 4) == wanted & 0xFFFFFFFF
    cfg.write(GFSELECT, 4, 1)
    assert cfg.read(GF, 4) == wanted >> 32
    cfg.write(GFSELECT, 4, 5)  # writes through a window that does not exist are dropped
    cfg.write(GF, 4, 0xFFFFFFFF)
    assert cfg.driver_features == wanted


def test_selecting_a_feature_window_does_not_change_the_features() -> None:
    cfg = make()
    cfg.write(STATUS, 1, ACK | DRIVER)
    wanted = bit(VIRTIO_F_VERSION_1) | bit(9)
    # High half first, then move the select back to 0 and read: a select write
    # carries no feature bits of its own.
    cfg.write(GFSELECT, 4, 1)
    cfg.write(GF, 4, wanted >> 32)
    cfg.write(GFSELECT, 4, 0)
    assert cfg.driver_features == bit(VIRTIO_F_VERSION_1)
    cfg.write(GF, 4, wanted & 0xFFFFFFFF)
    cfg.write(GFSELECT, 4, 1)
    cfg.write(GFSELECT, 4, 0)
    assert cfg.driver_features == wanted


def test_one_8_byte_write_selects_and_writes_a_feature_window() -> None:
    cfg = make()
    cfg.write(STATUS, 1, ACK | DRIVER)
    cfg.write(GFSELECT, 8, 1 | (bit(VIRTIO_F_VERSION_1) >> 32) << 32)
    assert cfg.driver_features == bit(VIRTIO_F_VERSION_1)


# -- status machine --------------------------------------------------------------
def test_full_initialisation_sequence() -> None:
    cfg = make()
    assert negotiate(cfg) is StatusEvent.FEATURES_OK
    assert cfg.read(STATUS, 1) == ACK | DRIVER | FEATURES_OK
    assert state(cfg) is DeviceState.FEATURES_OK
    setup_queue(cfg, 0, 128, 0x10000)
    assert cfg.write(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK) is StatusEvent.DRIVER_OK
    assert state(cfg) is DeviceState.DRIVER_OK
    assert cfg.read(STATUS, 1) == 0x0F
    assert cfg.driver_features == DEVICE_FEATURES


def test_features_are_frozen_after_features_ok() -> None:
    cfg = make()
    negotiate(cfg, bit(VIRTIO_F_VERSION_1))
    write_features(cfg, DEVICE_FEATURES)
    assert cfg.driver_features == bit(VIRTIO_F_VERSION_1)
    cfg.write(GFSELECT, 4, 1)
    assert cfg.read(GF, 4) == bit(VIRTIO_F_VERSION_1) >> 32


@pytest.mark.parametrize("features", [
    DEVICE_FEATURES | bit(3),                      # a bit the device never offered
    DEVICE_FEATURES | bit(63),
    DEVICE_FEATURES & ~bit(VIRTIO_F_VERSION_1),    # a legacy driver
    0,
])
def test_features_ok_is_refused_for_unacceptable_features(features: int) -> None:
    cfg = make()
    assert negotiate(cfg, features) is StatusEvent.NONE
    assert not cfg.read(STATUS, 1) & FEATURES_OK  # the driver re-reads and sees the refusal
    assert state(cfg) is DeviceState.NEGOTIATING
    # ... and DRIVER_OK cannot follow.
    assert cfg.write(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK) is not (
        StatusEvent.DRIVER_OK)
    assert state(cfg) is not DeviceState.DRIVER_OK


def test_features_ok_after_a_corrected_feature_set_is_accepted() -> None:
    cfg = make()
    assert negotiate(cfg, DEVICE_FEATURES | bit(3)) is StatusEvent.NONE
    write_features(cfg, bit(VIRTIO_F_VERSION_1))
    assert cfg.write(STATUS, 1, ACK | DRIVER | FEATURES_OK) is StatusEvent.FEATURES_OK


def test_features_ok_needs_the_negotiation_phase() -> None:
    cfg = make()
    # FEATURES_OK straight from reset, without ACKNOWLEDGE/DRIVER: nothing negotiated.
    assert cfg.write(STATUS, 1, FEATURES_OK) is StatusEvent.NONE
    assert not cfg.read(STATUS, 1) & FEATURES_OK
    assert cfg.state is not DeviceState.FEATURES_OK


def test_driver_ok_only_after_features_ok() -> None:
    cfg = make()
    cfg.write(STATUS, 1, ACK)
    cfg.write(STATUS, 1, ACK | DRIVER)
    write_features(cfg, bit(VIRTIO_F_VERSION_1))
    assert cfg.write(STATUS, 1, ACK | DRIVER | DRIVER_OK) is StatusEvent.NONE
    assert cfg.state is DeviceState.NEGOTIATING


def test_failed_is_reported() -> None:
    cfg = make()
    cfg.write(STATUS, 1, ACK | DRIVER)
    assert cfg.write(STATUS, 1, ACK | DRIVER | FAILED) is StatusEvent.FAILED
    assert cfg.state is DeviceState.FAILED
    assert cfg.read(STATUS, 1) & FAILED


def test_status_zero_resets_everything() -> None:
    cfg = make()
    negotiate(cfg)
    setup_queue(cfg, 1, 64, 0x40000)
    cfg.write(MSIX_CONFIG, 2, 0)
    cfg.write(DFSELECT, 4, 1)
    cfg.write(STATUS, 1, 0x0F)
    assert cfg.write(STATUS, 1, 0) is StatusEvent.RESET
    assert cfg.state is DeviceState.RESET
    assert cfg.read(STATUS, 1) == 0
    assert cfg.driver_features == 0
    assert cfg.read(MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    assert cfg.read(DFSELECT, 4) == 0 and cfg.read(Q_SELECT, 2) == 0
    for index in (0, 1):
        cfg.write(Q_SELECT, 2, index)
        assert cfg.read(Q_SIZE, 2) == MAX_SIZE
        assert cfg.read(Q_ENABLE, 2) == 0
        assert cfg.read(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
        assert read64(cfg, Q_DESC) == read64(cfg, Q_DRIVER) == read64(cfg, Q_DEVICE) == 0
    # A reset device negotiates again from scratch.
    assert negotiate(cfg, bit(VIRTIO_F_VERSION_1)) is StatusEvent.FEATURES_OK
    assert cfg.driver_features == bit(VIRTIO_F_VERSION_1)


def test_status_zero_inside_a_wider_write_still_resets() -> None:
    cfg = make()
    negotiate(cfg)
    # A 4-byte write at 0x14 covers status, generation and queue_select.
    assert cfg.write(STATUS, 4, 0) is StatusEvent.RESET
    assert cfg.state is DeviceState.RESET


def test_writes_elsewhere_do_not_touch_status() -> None:
    cfg = make()
    negotiate(cfg)
    assert cfg.write(MSIX_CONFIG, 2, 3) is StatusEvent.NONE
    assert cfg.write(Q_SELECT, 2, 1) is StatusEvent.NONE
    assert cfg.state is DeviceState.FEATURES_OK
    assert cfg.read(MSIX_CONFIG, 2) == 3


def test_needs_reset_sets_the_bit_and_bumps_the_generation() -> None:
    cfg = make()
    negotiate(cfg)
    generation = cfg.read(GENERATION, 1)
    cfg.needs_reset()
    assert cfg.read(STATUS, 1) & NEEDS_RESET
    assert cfg.read(GENERATION, 1) == (generation + 1) & 0xFF


def test_num_queues_and_generation_are_read_only() -> None:
    cfg = make()
    cfg.write(NUM_QUEUES, 2, 9)
    cfg.write(GENERATION, 1, 9)
    assert cfg.read(NUM_QUEUES, 2) == 2
    assert cfg.read(GENERATION, 1) == 0


# -- queue registers -------------------------------------------------------------
def test_queue_addresses_are_written_as_two_halves() -> None:
    cfg = make()
    negotiate(cfg)
    setup_queue(cfg, 1, 128, 0x1_2345_6000, enable=False)
    q = cfg.queues[1]
    assert (q.size, q.msix_vector) == (128, 2)
    assert (q.desc, q.driver, q.device) == (0x1_2345_6000, 0x1_2345_7000, 0x1_2345_8000)
    assert read64(cfg, Q_DESC) == 0x1_2345_6000
    assert cfg.read(Q_DRIVER, 8) == 0x1_2345_7000
    assert cfg.queues[0].desc == 0  # queue 0 untouched


def test_queue_addresses_accept_one_64_bit_write() -> None:
    cfg = make()
    cfg.write(Q_DEVICE, 8, 0xFFFF_0000_ABCD_E000)
    assert cfg.queues[0].device == 0xFFFF_0000_ABCD_E000


def test_each_queue_reads_its_own_registers_and_notify_offset() -> None:
    cfg = make(queues=3)
    for i in range(3):
        setup_queue(cfg, i, 16 << i, 0x100000 * (i + 1))
    for i in range(3):
        cfg.write(Q_SELECT, 2, i)
        assert cfg.read(Q_SIZE, 2) == 16 << i
        assert read64(cfg, Q_DESC) == 0x100000 * (i + 1)
        assert cfg.read(Q_ENABLE, 2) == 1
        assert cfg.read(Q_NOTIFY_OFF, 2) == i
        assert cfg.read(Q_NOTIFY_DATA, 2) == i


def test_queue_registers_are_ignored_while_the_queue_is_enabled() -> None:
    cfg = make()
    setup_queue(cfg, 0, 64, 0x20000)
    before = copy.copy(cfg.queues[0])
    cfg.write(Q_SIZE, 2, 32)
    cfg.write(Q_MSIX, 2, 7)
    write64(cfg, Q_DESC, 0x90000)
    cfg.write(Q_DRIVER, 8, 0x91000)
    cfg.write(Q_ENABLE, 2, 0)  # the driver may not disable a queue this way (4.1.4.3.2)
    assert cfg.queues[0] == before
    assert cfg.read(Q_ENABLE, 2) == 1


@pytest.mark.parametrize("size,accepted", [
    (1, True), (2, True), (64, True), (MAX_SIZE, True),
    (0, False), (3, False), (100, False), (255, False), (MAX_SIZE * 2, False), (0xFFFF, False),
])
def test_queue_size_must_be_a_power_of_two_up_to_the_maximum(size: int, accepted: bool) -> None:
    cfg = make()
    cfg.write(Q_SIZE, 2, 16)
    cfg.write(Q_SIZE, 2, size)
    assert cfg.read(Q_SIZE, 2) == (size if accepted else 16)


@pytest.mark.parametrize("select", [2, 3, 0x7FFF, 0xFFFF])
def test_out_of_range_queue_select_reads_size_zero_and_drops_writes(select: int) -> None:
    cfg = make(queues=2)
    cfg.write(Q_SELECT, 2, select)
    assert cfg.read(Q_SELECT, 2) == select
    assert cfg.read(Q_SIZE, 2) == 0
    assert cfg.read(Q_NOTIFY_OFF, 2) == 0
    cfg.write(Q_SIZE, 2, 8)
    write64(cfg, Q_DESC, 0x5000)
    cfg.write(Q_ENABLE, 2, 1)
    assert cfg.read(Q_SIZE, 2) == 0
    assert read64(cfg, Q_DESC) == 0
    assert cfg.read(Q_ENABLE, 2) == 0
    assert all(q == QueueConfig(MAX_SIZE) for q in cfg.queues)


def test_switching_queues_does_not_carry_registers_across() -> None:
    cfg = make()
    setup_queue(cfg, 0, 32, 0x30000, enable=False)
    cfg.write(Q_SELECT, 2, 1)
    assert cfg.read(Q_SIZE, 2) == MAX_SIZE
    assert read64(cfg, Q_DESC) == 0
    assert cfg.queues[1] == QueueConfig(MAX_SIZE)


@pytest.mark.parametrize("offset,size", [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0x38, 8),
                                         (0x1000, 4)])
def test_accesses_outside_the_structure_are_ignored(offset: int, size: int) -> None:
    cfg = make()
    negotiate(cfg)
    assert cfg.read(offset, size) == 0
    assert cfg.write(offset, size, (1 << 8 * size) - 1) is StatusEvent.NONE
    assert cfg.state is DeviceState.FEATURES_OK


# -- anything a guest can write ------------------------------------------------------
ACCESS = st.tuples(st.integers(-4, SIZE + 4), st.sampled_from([0, 1, 2, 3, 4, 8]),
                   st.integers(0, (1 << 64) - 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(ACCESS, max_size=40))
def test_random_accesses_never_raise_and_keep_the_invariants(
        accesses: list[tuple[int, int, int]]) -> None:
    cfg = make()
    for offset, size, value in accesses:
        event = cfg.write(offset, size, value)
        assert isinstance(event, StatusEvent)
        for roff, rsize in ((offset, size), (STATUS, 1), (Q_SIZE, 2), (Q_DESC, 8)):
            assert 0 <= cfg.read(roff, rsize) < 1 << 8 * max(rsize, 0)
        for q in cfg.queues:
            assert 0 < q.size <= MAX_SIZE and q.size & (q.size - 1) == 0
        if cfg.state in (DeviceState.FEATURES_OK, DeviceState.DRIVER_OK):
            assert not cfg.driver_features & ~DEVICE_FEATURES
            assert cfg.driver_features & bit(VIRTIO_F_VERSION_1)
        if cfg.state is DeviceState.RESET:
            assert cfg.driver_features == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(ACCESS, max_size=30))
def test_features_never_change_outside_negotiation(accesses: list[tuple[int, int, int]]) -> None:
    cfg = make()
    negotiate(cfg, bit(VIRTIO_F_VERSION_1) | bit(9))
    for offset, size, value in accesses:
        touches_status = offset <= STATUS < offset + size
        if touches_status:
            continue  # a reset (status 0) legitimately clears them
        cfg.write(offset, size, value)
        assert cfg.driver_features == bit(VIRTIO_F_VERSION_1) | bit(9)
        assert cfg.state is DeviceState.FEATURES_OK
