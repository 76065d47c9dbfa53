"""Building and caching the Linux test guest (kernel + busybox initramfs).

Owns the cache (layout, key, locking, atomic replacement), the list of
kernel modules the guest carries, the ``dvmm guest build`` command, and the
order of the build steps.  Downloading lives in :mod:`.debian`, the root
file system in :mod:`.initramfs`, the archive format in :mod:`.cpio`.

Cache layout (``default_cache_dir()``)::

    .lock                                  flock held while checking/building
    debs/<package>_<version>_amd64.deb     kept so an init change needs no download
    <kernel version>/vmlinuz               the bzImage (Linux boot protocol)
    <kernel version>/vmlinux               the same kernel uncompressed (PVH boot);
                                           vmlinux.unavailable says why if absent
    <kernel version>/initrd-<key>.cpio.gz  key = hash(kernel version, init.sh,
                                           module list, layout code, BUILD_FORMAT)

Initramfs files of other keys are left alone (another checkout sharing the
cache may still use them); they are ~2.3 MB each.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from dvmm_core.guest import cpio, debian, initramfs, kernel, tools
from dvmm_core.guest.debian import GuestBuildError

Log = Callable[[str], object]

# Loaded by /init in this order; modprobe pulls in the dependencies
# (virtio, virtio_ring, virtio_pci_*_dev, failover, drm*, jbd2, mbcache...).
# crc32c_generic is listed before ext4 because jbd2/ext4 only *softdep* on
# crc32c (modules.softdep), which busybox modprobe ignores.  crc32c_intel is
# left out: QEMU's default TCG CPU lacks SSE4.2, so it cannot load there.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_gpu", "virtio_input", "evdev",
    "crc32c_generic", "ext4",
)  # fmt: skip
# Missing from some kernels: skipped instead of failing the build.
OPTIONAL_MODULES: frozenset[str] = frozenset({"virtio_input", "evdev"})
# Bump when the initramfs layout changes in a way the key does not see.
BUILD_FORMAT = 1


@dataclass(frozen=True)
class GuestArtifacts:
    """A bootable guest: ``-kernel kernel -initrd initrd`` for kernel *version*.

    *vmlinux* is the same kernel uncompressed, with the PVH entry note: QEMU
    boots it (``-kernel vmlinux``) in about half the time under TCG, because
    the bzImage spends ~2.5 s in its xz decompressor.  None if the kernel
    cannot be booted that way.
    """

    kernel: Path
    initrd: Path
    version: str
    vmlinux: Path | None = None


def default_cache_dir() -> Path:
    """``${DVMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}}/dvmm/guest``."""
    base = os.environ.get("DVMM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base or Path.home() / ".cache") / "dvmm" / "guest"


def init_script() -> bytes:
    """The guest's ``/init`` (package data next to this module)."""
    return (Path(__file__).parent / "init.sh").read_bytes()


def cache_key(version: str) -> str:
    """Changes whenever the initramfs would come out different.

    Covers the kernel version, /init, the module list and the code that lays
    out the archive (so editing it cannot leave a stale initramfs behind).
    """
    h = hashlib.sha256(f"{BUILD_FORMAT}\0{version}\0".encode())
    for part in (init_script(), "\0".join(GUEST_MODULES).encode(), *_layout_sources(),
                 *tools.sources()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _layout_sources() -> list[bytes]:
    return [Path(mod.__file__).read_bytes() for mod in (cpio, initramfs) if mod.__file__]


def artifact_paths(cache_dir: Path, version: str) -> GuestArtifacts:
    vdir = cache_dir / version
    initrd = vdir / f"initrd-{cache_key(version)}.cpio.gz"
    return GuestArtifacts(vdir / "vmlinuz", initrd, version)


def build_guest(
    cache_dir: Path | None = None, force: bool = False, log: Log = print
) -> GuestArtifacts:
    """Return the cached guest, building whatever part of it is missing.

    *force* re-downloads the packages and rebuilds both files.  Raises
    :class:`GuestBuildError` (one-line message) when a tool or download fails.
    """
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        version = _resolve_version(cache, log)
        arts = artifact_paths(cache, version)
        if force or not (arts.kernel.exists() and arts.initrd.exists()):
            _build(cache, arts, force, log)
        return replace(arts, vmlinux=_ensure_vmlinux(arts, force, log))


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialize builders (parallel test workers) on one cache directory."""
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _resolve_version(cache: Path, log: Log) -> str:
    """The packaged kernel version; offline, the newest one already cached."""
    try:
        return debian.kernel_version()
    except GuestBuildError:
        cached = sorted(p.parent.name for p in cache.glob("*/vmlinuz"))
        if not cached:
            raise
        log(f"dvmm guest: apt-cache gave no kernel; using cached {cached[-1]}")
        return cached[-1]


def _build(cache: Path, arts: GuestArtifacts, force: bool, log: Log) -> None:
    debs = cache / "debs"
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        work = Path(tmp)
        kroot = _unpack(debian.kernel_package(arts.version), debs, work / "kernel", force, log)
        arts.kernel.parent.mkdir(parents=True, exist_ok=True)
        if force or not arts.kernel.exists():
            _install_atomic(kroot / "boot" / f"vmlinuz-{arts.version}", arts.kernel)
        busybox = _busybox(debs, work / "busybox", force, log)
        log(f"dvmm guest: building initramfs for {arts.version}")
        root = _stage_root(kroot, arts.version, busybox, work / "root", log)
        _write_initrd(root, arts.initrd)
    _prune_kernel_debs(debs, arts.version)


def _ensure_vmlinux(arts: GuestArtifacts, force: bool, log: Log) -> Path | None:
    """The PVH vmlinux next to the bzImage, made from it once (~1 s)."""
    vmlinux = arts.kernel.with_name("vmlinux")
    failed = arts.kernel.with_name("vmlinux.unavailable")
    if not force and (vmlinux.exists() or failed.exists()):
        return vmlinux if vmlinux.exists() else None
    try:
        kernel.make_vmlinux(arts.kernel, vmlinux)
    except GuestBuildError as exc:
        log(f"dvmm guest: no PVH vmlinux: {exc}")
        failed.write_text(f"{exc}\n")
        return None
    failed.unlink(missing_ok=True)
    return vmlinux


def _unpack(package: str, debs: Path, dest: Path, force: bool, log: Log) -> Path:
    if force or debian.cached_deb(package, debs) is None:
        log(f"dvmm guest: downloading {package}")
    debian.extract(debian.fetch_deb(package, debs, force), dest)
    return dest


def _busybox(debs: Path, dest: Path, force: bool, log: Log) -> Path:
    """busybox from the busybox-static package; the host's if that cannot be had."""
    try:
        return _unpack(debian.BUSYBOX_PACKAGE, debs, dest, force, log) / "bin" / "busybox"
    except GuestBuildError as exc:
        for host in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
            if _is_static_elf(host):
                log(f"dvmm guest: {exc}; using the host's {host}")
                return host
        raise


def _is_static_elf(path: Path) -> bool:
    """True for an x86-64 ELF without PT_INTERP (runs without the host's libc)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    types = (int.from_bytes(data[o : o + 4], "little")
             for o in range(phoff, phoff + phnum * phentsize, phentsize))  # fmt: skip
    return 3 not in types  # PT_INTERP


def _stage_root(kroot: Path, version: str, busybox: Path, root: Path, log: Log) -> Path:
    moddir = initramfs.modules_dir(kroot, version)
    initramfs.run_depmod(moddir.parents[2], version, busybox)
    index = initramfs.ModuleIndex.load(moddir)
    wanted = _available_modules(index, log)
    initramfs.make_root(root)
    initramfs.install_busybox(busybox, root)
    dest_moddir = root / "lib" / "modules" / version
    initramfs.copy_modules(index, index.closure(wanted), dest_moddir)
    initramfs.run_depmod(root, version, busybox)
    initramfs.install_init(root, init_script(), wanted)
    tools.install_tools(root)
    return root


def _available_modules(index: initramfs.ModuleIndex, log: Log) -> list[str]:
    known = index.by_name.keys() | index.builtin
    missing = [m for m in GUEST_MODULES if m not in known]
    required = [m for m in missing if m not in OPTIONAL_MODULES]
    if required:
        raise GuestBuildError(f"kernel lacks modules {', '.join(required)}")
    if missing:
        log(f"dvmm guest: optional modules not in this kernel: {', '.join(missing)}")
    return [m for m in GUEST_MODULES if m not in missing]


def _write_initrd(root: Path, initrd: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=initrd.parent, prefix=".initrd-")
    os.close(fd)
    try:
        entries = [cpio.char_device("dev/console", 5, 1), *cpio.tree_entries(root)]
        cpio.write_gzip_cpio(Path(tmp), iter(entries))
        os.chmod(tmp, 0o644)
        os.replace(tmp, initrd)
    except BaseException:
        os.unlink(tmp)
        raise


def _install_atomic(src: Path, dst: Path) -> None:
    if not src.exists():
        raise GuestBuildError(f"kernel package has no {src.name}")
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _prune_kernel_debs(debs: Path, version: str) -> None:
    """Keep only the current kernel's .deb (each one is ~70 MB)."""
    keep = f"{debian.kernel_package(version)}_"
    for deb in debs.glob("linux-image-*.deb"):
        if not deb.name.startswith(keep):
            deb.unlink(missing_ok=True)


# -- command line ---------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``guest build [--cache-dir D] [--force]`` on the ``dvmm`` CLI."""
    guest = subparsers.add_parser("guest", help="the Linux test guest (kernel + initramfs)")
    actions = guest.add_subparsers(dest="guest_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build the guest, or reuse the cached one")
    build.add_argument("--cache-dir", type=Path, default=None,
                       help=f"cache directory (default {default_cache_dir()})")  # fmt: skip
    build.add_argument("--force", action="store_true", help="download and rebuild everything")
    build.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    """``dvmm guest build``: print the artifact paths; one-line error on failure."""
    try:
        arts = build_guest(args.cache_dir, args.force, log=_log_stderr)
    except (GuestBuildError, OSError) as exc:  # OSError: e.g. an unwritable cache dir
        print(f"dvmm guest build: error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel:  {arts.kernel}\ninitrd:  {arts.initrd}\nvmlinux: {arts.vmlinux or '-'}")
    print(f"version: {arts.version}")
    return 0


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m dvmm_core.guest``), same as ``dvmm``."""
    parser = argparse.ArgumentParser(prog="dvmm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
