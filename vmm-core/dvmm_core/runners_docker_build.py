"""``dvmm docker build``: the backends' container images, built offline.

Owns the images the Docker runner (:mod:`.runners_docker`) starts: one per
device model (``dvmm-blk``, ``dvmm-net``, ``dvmm-display``), each ``FROM`` a base image, from
the Dockerfiles under ``docker/``.

No registry is reachable on the machines this project is built on, so the
base is made here: ``debootstrap --variant=minbase`` of Debian bookworm
with python3 and the backends' dependencies as Debian packages (pyzmq,
msgpack, psutil, zstandard, and libseccomp's own binding), stripped of
apt's caches and documentation, and ``docker import``-ed as
``dvmm-base:KEY``.  KEY hashes the suite and the package list, so the
base is rebuilt only when they change; the root file system is also kept
as a tarball in ``${DVMM_CACHE:-~/.cache/dvmm}/docker/``, so a new Docker
data root (CI starts a fresh daemon) only re-imports it.  ``--base IMAGE``
uses another base instead (``docker/base/Dockerfile.pip`` builds one from
``python:3.11-slim`` where Docker Hub is reachable).

The per-backend build context is assembled in a temporary directory: the
backend's Dockerfile and its two packages (``dvmm_shared`` and the
backend's), byte-compiled with this interpreter (same CPython minor
version as Debian's: the images run read-only and cannot write
``__pycache__``).  Each image is tagged ``latest`` and with a hash of its
context, and a context already built is not built again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from dvmm_shared.cli import UsageError, add_logging_args, setup_logging

log = logging.getLogger("dvmm.docker")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
#: (debootstrap resolves no virtual packages: python3-cffi-backend is named
#: for the cffi ABI that python3-zmq and python3-zstandard depend on.)
PACKAGES = ("python3", "python3-zmq", "python3-msgpack", "python3-psutil", "python3-seccomp",
            "python3-zstandard", "python3-cffi-backend")
#: What the base does not need at run time (its size, and its import time).
STRIP = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/locale", "usr/share/info")
BACKENDS = {"blk": "dvmm_blk", "net": "dvmm_net", "display": "dvmm_display"}


def cache_dir() -> Path:
    base = os.environ.get("DVMM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base or Path.home() / ".cache") / "dvmm" / "docker"


def base_key(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> str:
    return hashlib.sha256(f"{suite}\n{' '.join(sorted(packages))}\n".encode()).hexdigest()[:12]


def docker_dir() -> Path:
    """``docker/`` of the checkout this dvmm runs from."""
    import dvmm_shared

    root = Path(dvmm_shared.__file__).resolve().parent.parent.parent
    found = root / "docker"
    if not (found / "blk" / "Dockerfile").exists():
        raise UsageError(f"no docker/ directory with the Dockerfiles at {found} "
                         "(dvmm docker build runs from a dvmm checkout)")
    return found


def docker(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["docker", *args], check=True, text=True,
                              capture_output=capture)
    except FileNotFoundError:
        raise UsageError("no docker command (apt-get install docker.io)") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()[-1:] if capture else []
        raise UsageError(f"docker {args[0]} failed with status {exc.returncode}"
                         + (f": {detail[0]}" if detail else "")) from None


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                          check=False).returncode == 0


def base_rootfs(key: str, mirror: str) -> Path:
    """The base's root file system as a cached tarball (debootstrap once)."""
    tarball = cache_dir() / f"base-{key}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise UsageError("building the base image needs debootstrap (apt-get install "
                         "debootstrap), or pass --base IMAGE")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dvmm-rootfs-", dir=tarball.parent) as tmp:
        root = Path(tmp) / "root"
        log.info("debootstrap %s with %s (once; cached as %s)", SUITE, ", ".join(PACKAGES),
                 tarball)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                        SUITE, str(root), mirror], check=True, stdout=subprocess.DEVNULL)
        for rel in STRIP:
            shutil.rmtree(root / rel, ignore_errors=True)
        partial = Path(tmp) / "base.tar"
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."],
                       check=True)
        os.replace(partial, tarball)  # whole or absent: never a half tarball in the cache
    return tarball


def ensure_base(mirror: str = MIRROR) -> str:
    key = base_key()
    tag = f"dvmm-base:{key}"
    if not image_exists(tag):
        tarball = base_rootfs(key, mirror)
        log.info("importing %s as %s", tarball, tag)
        docker("import", str(tarball), tag, capture=True)
    return tag


def build_backend(kind: str, base: str) -> str:
    """Build ``dvmm-KIND`` from ``base``; returns the tag it got."""
    import compileall
    import importlib

    module = BACKENDS[kind]
    with tempfile.TemporaryDirectory(prefix=f"dvmm-{kind}-ctx-") as tmp:
        ctx = Path(tmp)
        shutil.copy(docker_dir() / kind / "Dockerfile", ctx / "Dockerfile")
        for pkg in ("dvmm_shared", module):
            src = Path(importlib.import_module(pkg).__file__ or "").parent
            shutil.copytree(src, ctx / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        digest = context_hash(ctx, base)
        tag = f"dvmm-{kind}:{digest}"
        if image_exists(tag):
            log.info("dvmm-%s is up to date (%s)", kind, tag)
        else:
            compileall.compile_dir(str(ctx), quiet=1)
            env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx
            out = subprocess.run(["docker", "build", "-q", "--build-arg", f"BASE={base}",
                                  "-t", tag, str(ctx)], env=env, capture_output=True,
                                 text=True, check=False)
            if out.returncode != 0:  # (its output otherwise: the legacy builder's notice)
                raise UsageError(f"docker build of dvmm-{kind} failed: "
                                 + " ".join(out.stderr.strip().splitlines()[-2:]))
            log.info("built %s", tag)
        docker("tag", tag, f"dvmm-{kind}:latest", capture=True)
        return tag


def context_hash(ctx: Path, base: str) -> str:
    h = hashlib.sha256(base.encode())
    for path in sorted(p for p in ctx.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(ctx)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def build(kinds: list[str], base: str | None = None, mirror: str = MIRROR) -> dict[str, str]:
    """Every image asked for (``kinds``), with their base; tag by kind."""
    base = base or ensure_base(mirror)
    return {kind: build_backend(kind, base) for kind in kinds}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("docker", help="build the backends' container images",
                       description="Container images for the dvmm backends (dvmm run "
                                   "--backend-runner docker uses them).")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = cmds.add_parser("build", help="build dvmm-blk, dvmm-net and dvmm-display (offline: "
                                      "the base comes from debootstrap, cached)")
    b.add_argument("kinds", nargs="*", metavar="KIND", help="blk, net, display (default: all)")
    b.add_argument("--base", metavar="IMAGE",
                   help="build FROM this image instead of the debootstrap base")
    b.add_argument("--mirror", default=MIRROR, help=f"Debian mirror (default {MIRROR})")
    add_logging_args(b)
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    setup_logging("dvmm-docker", args.verbose, args.quiet)
    unknown = [k for k in args.kinds if k not in BACKENDS]
    if unknown:
        raise UsageError(f"no image for {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    for kind, tag in build(args.kinds or list(BACKENDS), args.base, args.mirror).items():
        print(f"dvmm-{kind}:latest = {tag}")
    return 0
