"""Virtio constants named as in the virtio 1.2 specification.

Only numbers live here: feature bits, descriptor and ring flags, device IDs,
status bits and the device-specific numbers dvmm's devices use.  The layout
code (rings, config structs) lives beside the code that reads it.
"""

from enum import IntEnum, IntFlag

# 2.1 Device status field
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# 6 Reserved feature bits
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40

# 2.7.5 / 2.7.6 / 2.7.8 split virtqueue flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Sizes of the split-ring parts (2.7): descriptor 16 B, avail/used headers 4 B,
# avail entry 2 B, used element 8 B, trailing event word 2 B.
VIRTQ_DESC_SIZE = 16
VIRTQ_USED_ELEM_SIZE = 8
VIRTQ_MAX_SIZE = 32768


class VirtioDeviceId(IntEnum):
    """5 Device Types."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    GPU = 16
    INPUT = 18


# 5.2.3 Block device feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_LIFETIME = 15
VIRTIO_BLK_F_SECURE_ERASE = 16


class VirtioBlkReqType(IntEnum):
    """5.2.6 Block device request types."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class VirtioBlkStatus(IntEnum):
    """5.2.6 Block device request status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


VIRTIO_BLK_SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1


class VirtioStatus(IntFlag):
    """Device status bits as a flag set (2.1)."""

    ACKNOWLEDGE = VIRTIO_CONFIG_S_ACKNOWLEDGE
    DRIVER = VIRTIO_CONFIG_S_DRIVER
    DRIVER_OK = VIRTIO_CONFIG_S_DRIVER_OK
    FEATURES_OK = VIRTIO_CONFIG_S_FEATURES_OK
    NEEDS_RESET = VIRTIO_CONFIG_S_NEEDS_RESET
    FAILED = VIRTIO_CONFIG_S_FAILED


def bit(n: int) -> int:
    """The feature mask of feature bit ``n``."""
    return 1 << n
