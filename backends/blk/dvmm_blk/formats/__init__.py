"""Disk image formats for the blk backend and ``dvmm img``.

A format is a translation from guest offsets to file extents plus the
metadata updates a write needs (:mod:`.base`).  qcow2 (versions 2 and 3)
is read and written (:mod:`.qcow2_image`, :mod:`.qcow2_write`,
:mod:`.qcow2_alloc`, :mod:`.qcow2_tables`, :mod:`.qcow2_header`,
:mod:`.qcow2_check`, :mod:`.qcow2_create`, :mod:`.qcow2_snapshot`); vmdk,
vpc and qed are read (:mod:`.vmdk`, :mod:`.vpc`, :mod:`.qed`).  Opening,
detection and backing chains are :mod:`.registry`'s.
"""

from .base import BlockImage, ImageCorrupt, ImageError, ImageUnsupported
from .registry import FORMATS, READ_ONLY_FORMATS, open_image, probe, probe_file

__all__ = [
           "FORMATS",
           "READ_ONLY_FORMATS",
           "BlockImage",
           "ImageCorrupt",
           "ImageError",
           "ImageUnsupported",
           "open_image",
           "probe",
           "probe_file",
]
