"""``--display vnc=...,input=virtio``: the machine plugs two virtio-input-pci
functions (1af4:1052, input controller class 0x0980) -- a keyboard and a
tablet -- served by the display process on sockets of its own
(vhost-user-input), through the generic vhost device path.

Built with the real ``Machine`` (it opens /dev/kvm) and a real display
process; the functions' PCI config and their virtio-input config (virtio 1.2
5.8.4: select/subsel written, the item read back through BAR 4) are read the
way a guest driver reads them.  No guest here drives them (SeaBIOS has no
virtio-input driver; Linux does not boot under this machine's KVM).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from corevm import kvm_usable
from dvmm_core.machine.display import INPUT_CONFIG_SIZE, DisplaySpec
from dvmm_core.machine.pc import Machine, MachineConfig
from dvmm_core.machine.vhost_devices import DeviceStart
from dvmm_core.run import parse_display
from dvmm_core.virtio_pci.transport import DEVICE_OFFSET
from dvmm_shared.cli import UsageError

pytestmark = pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable()))

ID_NAME, EV_BITS, EV_KEY, EV_ABS = 0x01, 0x11, 0x01, 0x03


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(MachineConfig(memory=64 << 20, standby=False,
                              display=DisplaySpec("127.0.0.1:0", input="virtio")))
    try:
        yield m
    finally:
        m.shutdown("test over")


def read_item(transport: object, select: int, subsel: int) -> bytes:
    """What Linux's virtinput_cfg_select does: write select/subsel, read size, read u."""
    t = transport
    t.bar4_write(DEVICE_OFFSET + 0, 1, select)  # type: ignore[attr-defined]
    t.bar4_write(DEVICE_OFFSET + 1, 1, subsel)  # type: ignore[attr-defined]
    size = t.bar4_read(DEVICE_OFFSET + 2, 1)  # type: ignore[attr-defined]
    return bytes(t.bar4_read(DEVICE_OFFSET + 8 + i, 1)  # type: ignore[attr-defined]
                 for i in range(size))


def test_keyboard_and_tablet_functions_are_served_by_the_display(machine: Machine) -> None:
    assert machine.cfg.display is not None
    machine._add_display(machine.cfg.display)
    names = [d.name for d in machine.devices]
    assert names == ["display0-keyboard", "display0-tablet"]
    assert all(d.config_size == INPUT_CONFIG_SIZE == 136 for d in machine.devices)
    for device in machine.devices:
        device.begin()
    assert machine.display is not None
    machine.display.begin()
    for slot, (device, name) in enumerate(zip(machine.devices, (b"dvmm virtio keyboard",
                                                                b"dvmm virtio tablet"),
                                              strict=True), start=2):
        # the guest's first config read waits for the backend, then sees the function
        assert machine.pci.config_read(0, slot, 0, 0, 4) == 0x1052_1AF4
        assert device.state is DeviceStart.READY, device.failure
        assert machine.pci.config_read(0, slot, 0, 0x08, 4) >> 8 == 0x098000
        function = device.function
        assert function is not None
        assert read_item(function.transport, ID_NAME, 0) == name
    kbd, tablet = (d.function for d in machine.devices)
    assert kbd is not None and tablet is not None
    assert read_item(kbd.transport, EV_BITS, EV_ABS) == b""
    assert len(read_item(kbd.transport, EV_BITS, EV_KEY)) == 16  # keys up to KEY_COMPOSE
    assert read_item(tablet.transport, EV_BITS, EV_ABS) == b"\x03"  # ABS_X, ABS_Y
    assert machine.display.wait_ready(30)


def test_the_option_parses() -> None:
    spec = parse_display("vnc=127.0.0.1:5900,input=virtio,gpu=virtio")
    assert (spec.input, spec.gpu) == ("virtio", "virtio")
    assert spec.backend_args("ipc://c", {"keyboard": "/k", "tablet": "/t"})[-4:] == [
        "--input-socket", "/k", "--tablet-socket", "/t"]
    with pytest.raises(UsageError):
        parse_display("vnc=127.0.0.1:5900,input=ps2")
