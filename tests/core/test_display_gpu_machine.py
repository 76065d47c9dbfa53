"""``--display vnc=...,gpu=virtio``: the machine plugs the virtio-gpu-pci
function (1af4:1050, display controller 0x0380) served by the display process
itself, through the generic vhost device path (``machine/vhost_devices``).

Built with the real ``Machine`` (it opens /dev/kvm) and a real display
process; the function's config space and its virtio device config (virtio
1.2 5.7.4: events_read, events_clear, num_scanouts, num_capsets) are read the
way the guest reads them: PCI config cycles and BAR 4.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from corevm import kvm_usable
from dvmm_core.machine.display import DisplaySpec
from dvmm_core.machine.pc import GPU_CONFIG_SIZE, Machine, MachineConfig
from dvmm_core.machine.vhost_devices import DeviceStart
from dvmm_core.virtio_pci.transport import DEVICE_OFFSET

pytestmark = pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable()))


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(MachineConfig(memory=64 << 20, standby=False,
                              display=DisplaySpec("127.0.0.1:0", gpu="virtio")))
    try:
        yield m
    finally:
        m.shutdown("test over")


def test_gpu_function_is_plugged_and_served_by_the_display(machine: Machine) -> None:
    assert machine.cfg.display is not None
    machine._add_display(machine.cfg.display)
    (device,) = machine.devices
    assert device.name == "display0" and device.config_size == GPU_CONFIG_SIZE == 16
    assert machine.display is not None and machine.display.device is device
    device.begin()
    machine.display.begin()
    slot = 2  # the first PCI slot after the host and ISA bridges
    # The guest's first config read waits for the backend, then sees the function.
    assert machine.pci.config_read(0, slot, 0, 0, 4) == 0x1050_1AF4
    assert device.state is DeviceStart.READY, device.failure
    assert machine.pci.config_read(0, slot, 0, 0x08, 4) >> 8 == 0x038000  # class/sub/prog-if
    assert machine.pci.config_read(0, slot, 0, 0x2C, 4) == 0x1100_1AF4   # subsystem
    assert machine.display.wait_ready(30)
    assert machine.display.link is device.link is machine.links["display0"]
    function = device.function
    assert function is not None
    transport = function.transport
    events_read = transport.bar4_read(DEVICE_OFFSET + 0, 4)
    num_scanouts = transport.bar4_read(DEVICE_OFFSET + 8, 4)
    num_capsets = transport.bar4_read(DEVICE_OFFSET + 12, 4)
    assert (events_read, num_scanouts, num_capsets) == (0, 1, 0)
    assert device.link is not None
    features = device.link.device_features
    assert features >> 32 & 1 and features >> 1 & 1  # VIRTIO_F_VERSION_1, VIRTIO_GPU_F_EDID
