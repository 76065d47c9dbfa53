"""``dvmm chaos fuzz``: coverage-guided hostile-frontend fuzzers (atheris/libFuzzer).

Owns the list of targets (:data:`TARGETS`): what each fuzzes, the module
whose ``target(arg, work)`` builds its one-input function, and the dvmm
modules it instruments for coverage.  The child process that runs libFuzzer
is :mod:`.run`; the parent that starts it, bounds it and reports is
:mod:`.runner`.  The targets live beside them, one module per family:
:mod:`.vhost` (vhost-user message streams), :mod:`.virtqueue` (descriptor
chains and device requests in guest memory), :mod:`.gpu` (virtio-gpu
commands), :mod:`.qmp` (QMP byte streams), :mod:`.selftest`.
"""

from __future__ import annotations

from dataclasses import dataclass

_SHARED = ("dvmm_shared.memory", "dvmm_shared.virtqueue", "dvmm_shared.chain",
           "dvmm_shared.inflight")
_VHOST = (*_SHARED, "dvmm_shared.vhost_user.message", "dvmm_shared.vhost_user.connection",
          "dvmm_shared.vhost_user.session", "dvmm_shared.vhost_user.vring",
          "dvmm_shared.vhost_user.daemon", "dvmm_shared.vhost_user.watches")
_BLK = ("dvmm_blk.device", "dvmm_blk.request", "dvmm_blk.disk", "dvmm_blk.dispatch")
_NET = ("dvmm_net.device", "dvmm_net.header", "dvmm_net.request", "dvmm_net.rx", "dvmm_net.tx",
        "dvmm_net.pair")
_GPU = ("dvmm_display.device", "dvmm_display.gpu_protocol", "dvmm_display.resources",
        "dvmm_display.recovery", "dvmm_display.gpu_socket", "dvmm_display.framebuffer")

#: What coverage is taken of: the dvmm code under test, never the harness.
INSTRUMENTED = ("dvmm_shared", "dvmm_blk", "dvmm_net", "dvmm_display", "dvmm_core.qmp")
#: Fuzzed but not instrumented: atheris 2.3's bytecode rewriting on CPython
#: 3.11 makes ``dvmm_net.tx.transmit`` segfault at its first call (a ``for``
#: loop inside ``while True`` with returns in both; the same function
#: uninstrumented runs the same inputs fine -- reproduced with a copy of it
#: outside dvmm).
NOT_INSTRUMENTED = ("dvmm_net.tx",)


@dataclass(frozen=True)
class Target:
    name: str
    help: str
    module: str          # under dvmm_core.chaos.fuzz; has target(arg, work)
    arg: str
    imports: tuple[str, ...]
    hidden: bool = False  # a self-test, not a fuzzer of dvmm


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("vhost-user-blk", "vhost-user message streams into the blk backend's daemon",
           "vhost", "blk", (*_VHOST, *_BLK)),
    Target("vhost-user-net", "vhost-user message streams into the net backend's daemon",
           "vhost", "net", (*_VHOST, *_NET)),
    Target("vhost-user-display", "vhost-user message streams into the display backend's "
           "daemon (GPU_SET_SOCKET included)", "vhost", "display", (*_VHOST, *_GPU)),
    Target("virtqueue-blk", "descriptor tables, available rings, indirect tables and "
           "virtio-blk requests in guest memory, served by the blk device",
           "virtqueue", "blk", (*_SHARED, "dvmm_shared.vhost_user.vring", *_BLK)),
    Target("virtqueue-net", "TX chains, control-queue commands and RX buffers in guest "
           "memory, served by the net device",
           "virtqueue", "net", (*_SHARED, "dvmm_shared.vhost_user.vring", *_NET)),
    Target("virtio-gpu", "virtio-gpu control and cursor commands (every type; hostile ids, "
           "sizes, rectangles, offsets, backing entries) on the display device",
           "gpu", "gpu", (*_SHARED, *_GPU)),
    Target("qmp", "QMP byte streams into a QMP session: JSON stream, negotiation, "
           "commands and HMP (a fake machine behind the commands)",
           "qmp", "qmp", ("dvmm_core.qmp.stream", "dvmm_core.qmp.protocol",
                          "dvmm_core.qmp.session", "dvmm_core.qmp.commands",
                          "dvmm_core.qmp.hmp")),
    Target("selftest-crash", "self-test: raises on inputs starting with b'CRASH' "
           "(the runner must report it)", "selftest", "crash", (), hidden=True),
)}
