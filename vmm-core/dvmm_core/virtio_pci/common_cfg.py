"""The virtio-pci common configuration structure and device status machine.

Owns ``struct virtio_pci_common_cfg`` (virtio 1.2 section 4.1.4.3): feature
windows, queue selection and per-queue registers, and the device status
field with its lifecycle (2.1, 3.1.1).  Accesses of any width at any offset
are accepted (Linux writes 64-bit addresses as two 32-bit halves): the
structure is rendered to bytes, patched, and decoded again.  It knows
nothing of vhost-user; the transport reacts to :class:`StatusEvent`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum

from dvmm_shared.virtio import VIRTIO_F_VERSION_1, VirtioStatus

# le32 dfselect, le32 dfeature, le32 gfselect, le32 gfeature, le16 msix_config,
# le16 num_queues, u8 status, u8 generation, le16 queue_select, le16 queue_size,
# le16 queue_msix_vector, le16 queue_enable, le16 queue_notify_off,
# le64 queue_desc, le64 queue_driver, le64 queue_device,
# le16 queue_notify_data, le16 queue_reset
LAYOUT = struct.Struct("<IIIIHHBBHHHHHQQQHH")
SIZE = LAYOUT.size  # 0x3C
VIRTIO_MSI_NO_VECTOR = 0xFFFF


class DeviceState(Enum):
    """Where the driver is in the initialisation sequence (3.1.1)."""

    RESET = "reset"
    NEGOTIATING = "negotiating"  # ACKNOWLEDGE/DRIVER, features being exchanged
    FEATURES_OK = "features-ok"
    DRIVER_OK = "driver-ok"
    FAILED = "failed"


class StatusEvent(Enum):
    """What a status write asks of the transport."""

    NONE = "none"
    RESET = "reset"
    FEATURES_OK = "features-ok"
    DRIVER_OK = "driver-ok"
    FAILED = "failed"


@dataclass
class QueueConfig:
    """One virtqueue's registers as the driver programmed them."""

    max_size: int
    size: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


@dataclass
class CommonConfig:
    """The register file plus the status state machine."""

    device_features: int
    queues: list[QueueConfig]
    driver_features: int = 0
    status: int = 0
    state: DeviceState = DeviceState.RESET
    generation: int = 0
    msix_config: int = VIRTIO_MSI_NO_VECTOR
    dfselect: int = 0
    gfselect: int = 0
    queue_select: int = 0
    _spare: QueueConfig = field(default_factory=lambda: QueueConfig(0))

    @property
    def selected(self) -> QueueConfig:
        """The selected queue; an out-of-range selection reads as size 0."""
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        self._spare.reset()
        return self._spare

    def render(self) -> bytes:
        q = self.selected
        return LAYOUT.pack(
            self.dfselect, _window(self.device_features, self.dfselect),
            self.gfselect, _window(self.driver_features, self.gfselect),
            self.msix_config, len(self.queues), self.status, self.generation & 0xFF,
            self.queue_select, q.size, q.msix_vector, int(q.enabled),
            self.queue_select if q.max_size else 0,  # notify offset = queue index
            q.desc, q.driver, q.device, self.queue_select, 0,
        )

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > SIZE:
            return 0
        return int.from_bytes(self.render()[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> StatusEvent:
        if offset < 0 or offset + size > SIZE:
            return StatusEvent.NONE
        image = bytearray(self.render())
        image[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        fields = LAYOUT.unpack(bytes(image))
        status_written = offset <= 0x14 < offset + size
        # Only a write that reaches driver_feature changes the features: a bare
        # driver_feature_select write must not copy the old window into the new.
        feature_written = offset < 0x10 and offset + size > 0x0C
        self._apply(fields, feature_written)
        return self._set_status(fields[6]) if status_written else StatusEvent.NONE

    def _apply(self, f: tuple[int, ...], feature_written: bool) -> None:
        self.dfselect, self.gfselect = f[0], f[2]
        if feature_written and self.state is DeviceState.NEGOTIATING:  # frozen after FEATURES_OK
            self.driver_features = _set_window(self.driver_features, self.gfselect, f[3])
        self.msix_config = f[4]
        old_select = self.queue_select
        self.queue_select = f[8]
        q = self.selected
        if self.queue_select != old_select or not q.max_size or q.enabled:
            return  # switching queues, a missing queue, or a live one: no register changes
        if 0 < f[9] <= q.max_size and f[9] & (f[9] - 1) == 0:
            q.size = f[9]
        q.msix_vector = f[10]
        q.desc, q.driver, q.device = f[13], f[14], f[15]
        q.enabled = bool(f[11] & 1)

    def _set_status(self, value: int) -> StatusEvent:
        """Status writes drive the lifecycle (2.1.2, 3.1.1)."""
        if value == 0:
            self.reset()
            return StatusEvent.RESET
        new = value & ~self.status
        self.status = value & 0xFF
        if new & VirtioStatus.FAILED:
            self.state = DeviceState.FAILED
            return StatusEvent.FAILED
        if new & VirtioStatus.FEATURES_OK:
            if not self._features_acceptable():
                self.status &= ~VirtioStatus.FEATURES_OK  # the driver re-reads and gives up
                return StatusEvent.NONE
            self.state = DeviceState.FEATURES_OK
            return StatusEvent.FEATURES_OK
        if new & VirtioStatus.DRIVER_OK and self.state is DeviceState.FEATURES_OK:
            self.state = DeviceState.DRIVER_OK
            return StatusEvent.DRIVER_OK
        if self.state is DeviceState.RESET and value & (VirtioStatus.ACKNOWLEDGE
                                                      | VirtioStatus.DRIVER):
            self.state = DeviceState.NEGOTIATING
        return StatusEvent.NONE

    def _features_acceptable(self) -> bool:
        if self.state is not DeviceState.NEGOTIATING:
            return False
        if self.driver_features & ~self.device_features:
            return False
        return bool(self.driver_features & 1 << VIRTIO_F_VERSION_1)

    def reset(self) -> None:
        self.status = 0
        self.state = DeviceState.RESET
        self.driver_features = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.dfselect = self.gfselect = self.queue_select = 0
        for q in self.queues:
            q.reset()

    def needs_reset(self) -> None:
        """The device hit an error it cannot recover from alone (2.1.2)."""
        self.status |= VirtioStatus.NEEDS_RESET
        self.generation += 1


def _window(value: int, select: int) -> int:
    return (value >> (32 * select)) & 0xFFFFFFFF if select < 2 else 0


def _set_window(value: int, select: int, word: int) -> int:
    if select >= 2:
        return value
    shift = 32 * select
    return (value & ~(0xFFFFFFFF << shift)) | (word & 0xFFFFFFFF) << shift
