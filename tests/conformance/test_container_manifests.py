"""The container manifests under docker/ (issue 12): structure, not a cluster.

No Kubernetes cluster runs here and kubeconform is not packaged, so the pod
manifest and the compose file are checked structurally with PyYAML: every
backend is confined the same way (no network, read-only root, no
capabilities, no privilege escalation) and shares only the socket volume
(blk also its disk).  Running them is the compose test's and the runners'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
BACKENDS = ("blk", "net", "display")


def load(rel: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / rel).read_text())
    assert isinstance(data, dict)
    return data


def test_one_dockerfile_per_backend_built_from_a_base_argument() -> None:
    for kind in BACKENDS:
        text = (DOCKER / kind / "Dockerfile").read_text()
        assert "ARG BASE=python:3.11-slim" in text and "FROM ${BASE}" in text
        assert f'ENTRYPOINT ["python3", "-m", "dvmm_{kind}"]' in text
        assert "\nRUN " not in text  # building runs no container


def test_compose_confines_every_backend() -> None:
    compose = load("compose.yaml")
    assert "version" not in compose
    services = compose["services"]
    assert set(services) == set(BACKENDS)
    for name, svc in services.items():
        assert svc["network_mode"] == "none", name
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["security_opt"] == ["no-new-privileges:true"], name
        assert svc["image"] == f"dvmm-{name}:latest"
        mounts = [v.rsplit(":", 1)[1] for v in svc["volumes"]]  # ${VAR:-default}:TARGET
        assert mounts == (["/run/dvmm", "/disk/disk.img"] if name == "blk" else ["/run/dvmm"])
        args = svc["command"]
        assert args[args.index("--socket") + 1] == f"/run/dvmm/{name}.sock"


def test_pod_has_kvm_core_and_one_confined_sidecar_per_backend() -> None:
    pod = load("k8s/dvmm-pod.yaml")
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    assert pod["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes["sockets"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"core", *BACKENDS}
    core = containers["core"]
    assert core["resources"]["limits"]["devices.kubevirt.io/kvm"] == "1"
    assert core["command"][:2] == ["dvmm", "run"]
    for name in BACKENDS:
        c = containers[name]
        sec = c["securityContext"]
        assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"]
        assert sec["capabilities"]["drop"] == ["ALL"]
        assert c["image"] == f"dvmm-{name}:latest"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts == ({"sockets": "/run/dvmm", "disk": "/disk"} if name == "blk"
                          else {"sockets": "/run/dvmm"})
        assert f"/run/dvmm/{name}.sock" in c["args"]
    for c in pod["spec"]["containers"]:  # every name a mount uses is a volume of the pod
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
