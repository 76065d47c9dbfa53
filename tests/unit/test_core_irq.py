"""The GSI routing table and irqfd bindings the core keeps for KVM (machine/irq.py)."""

from __future__ import annotations

import pytest
from dvmm_core.kvm import MsiRoute
from dvmm_core.machine.irq import FIRST_MSI_GSI, MAX_GSI, IrqRouter

from .core_fakes import FakeVm

DEFAULTS = FakeVm.default_routes()


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def router(vm: FakeVm) -> IrqRouter:
    return IrqRouter(vm)


def test_gsis_are_allocated_from_24_up(router: IrqRouter) -> None:
    assert [router.allocate() for _ in range(3)] == [24, 25, 26]
    assert FIRST_MSI_GSI == 24


def test_released_gsis_are_reused(router: IrqRouter) -> None:
    a, b, c = router.allocate(), router.allocate(), router.allocate()
    router.release(b)
    assert router.allocate() == b
    assert router.allocate() == c + 1
    assert a == 24


def test_running_out_of_gsis(router: IrqRouter) -> None:
    gsis = [router.allocate() for _ in range(MAX_GSI - FIRST_MSI_GSI)]
    assert gsis == list(range(FIRST_MSI_GSI, MAX_GSI))
    with pytest.raises(RuntimeError, match="out of GSIs"):
        router.allocate()


def test_set_msi_submits_the_whole_table(router: IrqRouter, vm: FakeVm) -> None:
    router.set_msi(24, 0xFEE00000, 0, 0x4041)
    assert vm.routings == [[*DEFAULTS, MsiRoute(24, 0xFEE00000, 0, 0x4041)]]
    router.set_msi(25, 0xFEE01000, 0, 0x4042)
    assert vm.routings[-1] == [*DEFAULTS, MsiRoute(24, 0xFEE00000, 0, 0x4041),
                                 MsiRoute(25, 0xFEE01000, 0, 0x4042)]


def test_an_unchanged_route_is_not_resubmitted(router: IrqRouter, vm: FakeVm) -> None:
    router.set_msi(24, 0xFEE00000, 0, 0x4041)
    router.set_msi(24, 0xFEE00000, 0, 0x4041)
    assert len(vm.routings) == 1
    router.set_msi(24, 0xFEE00000, 0, 0x4051)
    assert len(vm.routings) == 2
    assert vm.routings[-1] == [*DEFAULTS, MsiRoute(24, 0xFEE00000, 0, 0x4051)]


def test_clear_msi_resubmits_without_the_route(router: IrqRouter, vm: FakeVm) -> None:
    router.set_msi(24, 0xFEE00000, 0, 0x41)
    router.set_msi(25, 0xFEE00000, 0, 0x42)
    router.clear_msi(24)
    assert vm.routings[-1] == [*DEFAULTS, MsiRoute(25, 0xFEE00000, 0, 0x42)]
    n = len(vm.routings)
    router.clear_msi(24)  # already gone: nothing to tell KVM
    router.clear_msi(99)
    assert len(vm.routings) == n


def test_release_forgets_the_route(router: IrqRouter, vm: FakeVm) -> None:
    gsi = router.allocate()
    router.set_msi(gsi, 0xFEE00000, 0, 0x41)
    router.release(gsi)
    other = router.allocate()
    assert other == gsi
    router.set_msi(router.allocate(), 0xFEE00000, 0, 0x43)
    assert MsiRoute(gsi, 0xFEE00000, 0, 0x41) not in vm.routings[-1]


def test_bind_assigns_an_irqfd_once(router: IrqRouter, vm: FakeVm) -> None:
    router.bind(7, 24)
    router.bind(7, 24)
    assert vm.irqfds == [(7, 24, False)]


def test_bind_moves_an_fd_by_deassigning_first(router: IrqRouter, vm: FakeVm) -> None:
    router.bind(7, 24)
    router.bind(7, 30)
    assert vm.irqfds == [(7, 24, False), (7, 24, True), (7, 30, False)]


def test_unbind(router: IrqRouter, vm: FakeVm) -> None:
    router.bind(7, 24)
    router.bind(8, 24)  # two fds may share a GSI (two queues on one vector)
    router.unbind(7)
    router.unbind(7)
    router.unbind(99)
    assert vm.irqfds == [(7, 24, False), (8, 24, False), (7, 24, True)]


def test_attach_replays_routes_and_irqfds_on_the_new_vm(router: IrqRouter, vm: FakeVm) -> None:
    router.set_msi(24, 0xFEE00000, 0, 0x41)
    router.set_msi(25, 0xFEE00000, 0, 0x42)
    router.bind(7, 24)
    router.bind(8, 25)
    router.bind(9, 25)
    router.unbind(9)
    fresh = FakeVm()
    before = (len(vm.routings), len(vm.irqfds))
    router.attach(fresh)
    assert fresh.routings == [[*DEFAULTS, MsiRoute(24, 0xFEE00000, 0, 0x41),
                                 MsiRoute(25, 0xFEE00000, 0, 0x42)]]
    assert sorted(fresh.irqfds) == [(7, 24, False), (8, 25, False)]
    assert (len(vm.routings), len(vm.irqfds)) == before  # the old VM hears nothing
    router.bind(7, 25)  # later changes go to the new VM
    assert fresh.irqfds[-2:] == [(7, 24, True), (7, 25, False)]


def test_attach_with_no_routes_still_installs_the_defaults(router: IrqRouter) -> None:
    fresh = FakeVm()
    router.attach(fresh)
    assert fresh.routings == [DEFAULTS]
    assert fresh.irqfds == []


def test_irq_line_goes_to_the_vm(router: IrqRouter, vm: FakeVm) -> None:
    router.irq_line(11, True)
    router.irq_line(11, False)
    assert vm.lines == [(11, True), (11, False)]
