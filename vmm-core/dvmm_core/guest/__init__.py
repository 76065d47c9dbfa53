"""The Linux test guest: Debian kernel + busybox initramfs, cached; disk images.

Public API re-exported here; the parts live in private-ish modules:
``build`` (cache, steps, CLI), ``debian`` (apt/dpkg), ``initramfs`` (root
tree, modules), ``cpio`` (archive format), ``images`` (test disks), and
``init.sh`` (the guest's /init and its serial command channel).
"""

from dvmm_core.guest.build import (
    GUEST_MODULES,
    GuestArtifacts,
    add_parser,
    build_guest,
    default_cache_dir,
)
from dvmm_core.guest.debian import GuestBuildError
from dvmm_core.guest.images import make_disk_image, pattern_bytes

__all__ = [
    "GUEST_MODULES",
    "GuestArtifacts",
    "GuestBuildError",
    "add_parser",
    "build_guest",
    "default_cache_dir",
    "make_disk_image",
    "pattern_bytes",
]
