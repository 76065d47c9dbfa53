"""Assembling the busybox initramfs staging tree.

Owns what goes into the guest's root file system: busybox and its applet
symlinks, the kernel modules (closed over ``modules.dep``, decompressed, with
a ``modules.dep`` of their own so busybox ``modprobe`` works in the guest),
the module load list and ``/init``.  It does not download anything (see
:mod:`dvmm_core.guest.debian`) and does not know about the cache.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dvmm_core.guest.debian import GuestBuildError

_COMPRESSED_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst")
# Metadata depmod reads besides the .ko files (modules.builtin keeps modprobe
# quiet about drivers compiled into the kernel).
_MODULE_METADATA = ("modules.builtin", "modules.builtin.modinfo", "modules.order")
_ROOT_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
              "run", "root", "etc/dvmm", "mnt")  # fmt: skip
MODULE_LIST_PATH = "etc/dvmm/modules"


def module_name(relpath: str) -> str:
    """``kernel/drivers/gpu/drm/virtio/virtio-gpu.ko`` -> ``virtio_gpu``."""
    base = relpath.rsplit("/", 1)[-1]
    base = base[: base.index(".ko")]
    return base.replace("-", "_")


@dataclass
class ModuleIndex:
    """The parsed ``modules.dep`` of one kernel (depmod lists transitive deps)."""

    moddir: Path
    deps: dict[str, list[str]] = field(default_factory=dict)
    by_name: dict[str, str] = field(default_factory=dict)
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
        index = cls(moddir)
        for line in (moddir / "modules.dep").read_text().splitlines():
            target, _, rest = line.partition(":")
            index.deps[target] = rest.split()
            index.by_name[module_name(target)] = target
        builtin = moddir / "modules.builtin"
        if builtin.exists():
            index.builtin = {module_name(p) for p in builtin.read_text().split()}
        return index

    def closure(self, names: Iterable[str]) -> list[str]:
        """Module paths needed to load *names*, dependencies first, no repeats."""
        ordered: dict[str, None] = {}
        for name in names:
            key = name.replace("-", "_")
            if key in self.builtin:
                continue
            if key not in self.by_name:
                raise GuestBuildError(f"kernel module {name} not found in {self.moddir}")
            target = self.by_name[key]
            for rel in [*reversed(self.deps[target]), target]:
                ordered.setdefault(rel, None)
        return list(ordered)


def run_depmod(base: Path, version: str, busybox: Path | None = None) -> None:
    """``depmod -b BASE VERSION``; busybox's depmod applet if kmod's is missing."""
    depmod = shutil.which("depmod", path=_sbin_path())
    if depmod is not None:
        argv = [depmod, "-b", str(base), version]
    elif busybox is not None:
        argv = [str(busybox), "depmod", "-b", str(base), version]
    else:
        raise GuestBuildError("depmod not found (install the kmod package)")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"depmod failed: {proc.stderr.strip()[-300:]}")


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def modules_dir(root: Path, version: str) -> Path:
    """Where an unpacked kernel package keeps its modules (lib/ or usr/lib/)."""
    for candidate in (root / "lib/modules" / version, root / "usr/lib/modules" / version):
        if candidate.is_dir():
            return candidate
    raise GuestBuildError(f"no modules directory for {version} in the kernel package")


def _decompressed(src: Path) -> tuple[str, bytes]:
    """(suffix-free name, plain bytes) of a module; busybox modprobe reads plain .ko."""
    name = src.name
    if name.endswith(".ko.xz"):
        return name[:-3], lzma.decompress(src.read_bytes())
    if name.endswith(".ko.gz"):
        return name[:-3], gzip.decompress(src.read_bytes())
    if name.endswith(".ko.zst"):
        return name[:-4], _unzstd(src)
    return name, src.read_bytes()


def _unzstd(src: Path) -> bytes:
    if shutil.which("zstd") is None:
        raise GuestBuildError(f"{src.name} is zstd-compressed: install the zstd package")
    return subprocess.run(["zstd", "-dc", str(src)], capture_output=True, check=True).stdout


def copy_modules(index: ModuleIndex, relpaths: Sequence[str], dest_moddir: Path) -> None:
    """Copy *relpaths* (decompressed) and depmod's metadata under *dest_moddir*."""
    for rel in relpaths:
        src = index.moddir / rel
        name, data = _decompressed(src)
        dst = dest_moddir / Path(rel).parent / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
    for meta in _MODULE_METADATA:
        if (index.moddir / meta).exists():
            shutil.copyfile(index.moddir / meta, dest_moddir / meta)
    _filter_order(dest_moddir / "modules.order", set(relpaths))


def _filter_order(order: Path, kept: set[str]) -> None:
    """modules.order lists every module of the kernel; keep the ones we ship."""
    if order.exists():
        lines = [_plain(ln) for ln in order.read_text().splitlines() if ln in kept]
        order.write_text("".join(f"{ln}\n" for ln in lines))


def _plain(relpath: str) -> str:
    """The module path once decompressed (``x.ko.xz`` -> ``x.ko``)."""
    return relpath[: relpath.index(".ko") + 3]


def install_busybox(busybox: Path, root: Path) -> None:
    """``/bin/busybox`` plus one symlink per applet at its usual place."""
    target = root / "bin/busybox"
    shutil.copyfile(busybox, target)
    target.chmod(0o755)
    for applet in _applets(busybox):
        link = root / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _applets(busybox: Path) -> list[str]:
    """``busybox --list-full``: ``usr/bin/awk`` etc. (a static binary runs anywhere)."""
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0 or not proc.stdout.strip():
        raise GuestBuildError(f"cannot list the applets of {busybox}")
    return [line.strip().lstrip("/") for line in proc.stdout.splitlines() if line.strip()]


def make_root(root: Path) -> None:
    """The empty directory skeleton of the guest root."""
    for name in _ROOT_DIRS:
        (root / name).mkdir(parents=True, exist_ok=True)


def install_init(root: Path, init_script: bytes, load_order: Sequence[str]) -> None:
    """``/init`` and the list of modules it loads, in order."""
    init = root / "init"
    init.write_bytes(init_script)
    init.chmod(0o755)
    (root / MODULE_LIST_PATH).write_text("".join(f"{m}\n" for m in load_order))
