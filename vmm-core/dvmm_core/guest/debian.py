"""Fetching and unpacking Debian packages for the test guest.

Owns the calls to ``apt-cache``, ``apt-get download`` and ``dpkg-deb``: which
kernel package the running distribution ships, downloading a ``.deb`` into a
directory, and unpacking one.  It knows nothing about initramfs layout or the
cache; every failure becomes a :class:`GuestBuildError` with a one-line
message that says what to do.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# ``Depends: linux-image-6.1.0-56-amd64`` in ``apt-cache depends`` output.
_KERNEL_DEP_RE = re.compile(r"Depends:\s*linux-image-(\d\S*-amd64)\b")


class GuestBuildError(Exception):
    """Building the guest failed; the message is one line, fit for a CLI."""


def _run(argv: list[str], cwd: Path | None = None, what: str = "") -> str:
    """Run a tool, return its stdout; raise GuestBuildError with its stderr.

    *what* names the step in the message (default: the command line).
    """
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} not found: {exc.strerror}") from None
    if proc.returncode != 0:
        raise GuestBuildError(f"{what or ' '.join(argv)} failed: {_last_line(proc.stderr)}")
    return proc.stdout


def _last_line(text: str) -> str:
    """The last error-looking line of a tool's stderr (apt prints warnings first)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "dpkg-deb: error"))]
    return (errors or lines or ["(no error output)"])[-1]


@functools.cache
def kernel_version() -> str:
    """The kernel version (``6.1.0-56-amd64``) the meta package currently points to.

    Uses only the local package lists (no network), so a cache hit needs no
    download.  ``apt-cache depends`` shows the candidate version's dependencies.
    Memoized: apt-cache takes most of a second.
    """
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    match = _KERNEL_DEP_RE.search(out)
    if match is None:
        raise GuestBuildError(
            f"cannot tell which kernel {KERNEL_META_PACKAGE} depends on "
            "(run 'apt-get update' first)"
        )
    return match.group(1)


def kernel_package(version: str) -> str:
    """The Debian package holding kernel *version*."""
    return f"linux-image-{version}"


def download(package: str, dest_dir: Path) -> Path:
    """``apt-get download`` *package* into *dest_dir*; return the ``.deb`` path.

    The download goes to a scratch directory next to *dest_dir* and is renamed
    in, so *dest_dir* never holds a partial file.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".dl-") as tmp:
        argv = ["apt-get", *_sandbox_opts(), "download", package]
        _run(argv, cwd=Path(tmp), what=f"apt-get download {package}")
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download {package} produced no .deb")
        final = dest_dir / debs[0].name
        os.replace(debs[0], final)
    return final


def _sandbox_opts() -> list[str]:
    """As root, apt drops to ``_apt``, which cannot write our cache dir; keep root."""
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def cached_deb(package: str, deb_dir: Path) -> Path | None:
    """A previously downloaded ``.deb`` of *package* in *deb_dir*, newest name last."""
    debs = sorted(deb_dir.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def fetch_deb(package: str, deb_dir: Path, force: bool = False) -> Path:
    """The ``.deb`` of *package*, downloading it unless one is kept in *deb_dir*."""
    deb = None if force else cached_deb(package, deb_dir)
    return deb if deb is not None else download(package, deb_dir)


def extract(deb: Path, dest: Path) -> None:
    """Unpack the file system tree of *deb* into *dest* (``dpkg-deb -x``)."""
    if shutil.which("dpkg-deb") is None:
        raise GuestBuildError("dpkg-deb not found (install the dpkg package)")
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
