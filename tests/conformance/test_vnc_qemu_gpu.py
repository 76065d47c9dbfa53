"""QEMU's vhost-user-gpu-pci frontend against dvmm's display process.

QEMU 7.2 refuses vhost-user-gpu-pci under TCG ("requires kvm") and no Linux
boots under this machine's KVM (kvm_pvm), so no guest driver reaches
DRIVER_OK and QEMU never sends VHOST_USER_GPU_SET_SOCKET here (that side is
tested against a spec-written peer: tests/unit/test_display_gpu_socket.py).
What does run: QEMU with KVM, CPUs never started, realizes the device over
dvmm's socket -- features, protocol features, the back-end channel
(SET_BACKEND_REQ_FD) and the rings' call/err fds -- and reports what it
accepted through QMP's ``x-query-virtio-status``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from dvmm_shared.control import command
from dvmm_shared.procs import log_tail, spawn, stop
from test_input_conformance import qmp, wait_for

pytestmark = pytest.mark.conformance


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")
def test_qemu_realizes_vhost_user_gpu_over_dvmm(tmp_path: Path) -> None:
    gpu, control = tmp_path / "gpu.sock", f"ipc://{tmp_path}/d.ctl"
    dlog, qlog, qmp_path = tmp_path / "display.log", tmp_path / "qemu.log", tmp_path / "qmp"
    display = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(gpu),
                     "--vnc", "127.0.0.1:0", "--control", control], dlog)
    qemu = None
    try:
        wait_for(lambda: os.path.exists(control[6:]) or display.poll() is not None, "listening")
        assert display.poll() is None, log_tail(dlog)
        qemu = spawn(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                      "-nodefaults", "-display", "none", "-S", "-m", "128",
                      "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
                      "-numa", "node,memdev=mem", "-chardev", f"socket,id=gpu,path={gpu}",
                      "-device", "vhost-user-gpu-pci,chardev=gpu",
                      "-qmp", f"unix:{qmp_path},server=on,wait=off"], qlog)
        wait_for(lambda: qmp_path.exists() or qemu is None or qemu.poll() is not None, "QMP")
        assert qemu.poll() is None, log_tail(qlog)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(qmp_path))
            reader = sock.makefile("r")
            reader.readline()
            qmp(sock, reader, "qmp_capabilities")
            (dev,) = qmp(sock, reader, "x-query-virtio")
            status = qmp(sock, reader, "x-query-virtio-status", path=dev["path"])
        assert status["device-id"] == 16 and status["num-vqs"] == 2
        features = json.dumps(status["host-features"])
        assert "VIRTIO_GPU_F_EDID" in features  # from dvmm's GET_FEATURES
        assert "VHOST_USER_F_PROTOCOL_FEATURES" in features
        stats = command(control, "stats")
        assert stats["connections"] == 1 and stats["protocol_errors"] == 0, stats
    finally:
        if qemu is not None:
            stop(qemu)
            print(log_tail(qlog))
        assert stop(display) == 0, log_tail(dlog)
