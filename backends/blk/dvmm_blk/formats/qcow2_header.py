"""qcow2 header: parse and check every field, the header extensions, encode.

Owns the first cluster of a qcow2 file (QEMU ``docs/interop/qcow2.txt``,
"Header" and "Header extensions"): the fixed fields of versions 2 and 3, the
feature bits, the backing file name, and the extensions dvmm reads (backing
format, feature names, bitmaps, compression type).  Every field is checked
against the others and against the file's size before anything uses it;
a bad one is an :class:`ImageCorrupt` naming it.  No I/O beyond the bytes
it is handed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .base import ImageCorrupt, ImageUnsupported

MAGIC = b"QFI\xfb"
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3 = struct.Struct(">QQQII")  # bytes 72..103
V2_LENGTH, V3_LENGTH = 72, 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # 512 B .. 2 MiB (QEMU's limit)
MAX_L1_BYTES = 32 << 20  # QEMU's implementation limits (qcow2.txt, "size")
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_SIZE = 1 << 61  # bytes: the largest virtual disk accepted

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
COMPAT_LAZY_REFCOUNTS = 1
AUTOCLEAR_BITMAPS = 1
KNOWN_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}

EXT_END, EXT_BACKING_FORMAT, EXT_FEATURES = 0, 0xE2792ACA, 0x6803F857
EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE = 0x23852875, 0x0537BE77, 0x44415441
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

#: Byte offsets of the fields dvmm rewrites in place.
OFF_REFTABLE = 48  # refcount_table_offset (8) + refcount_table_clusters (4)
OFF_INCOMPAT = 72


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: tuple[int, int, int] | None = None  # nb, directory size, offset
    extensions_end: int = 0  # first byte after the extension area

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def compat_name(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    def encode(self) -> bytes:
        """The fixed fields (72 or ``header_length`` bytes)."""
        out = HEADER_V2.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        if self.version == 2:
            return out
        out += HEADER_V3.pack(self.incompatible, self.compatible, self.autoclear,
                              self.refcount_order, self.header_length)
        extra = bytearray(self.header_length - V3_LENGTH)
        if extra:
            extra[0] = self.compression_type
        return out + bytes(extra)


def _aligned(value: int, cluster_size: int, what: str) -> None:
    if value % cluster_size:
        raise ImageCorrupt(f"qcow2 {what} {value:#x} is not aligned to a cluster")


def _inside(offset: int, length: int, file_size: int, what: str) -> None:
    if offset + length > file_size:
        raise ImageCorrupt(f"qcow2 {what} at {offset:#x} (+{length} bytes) lies beyond the "
                           f"end of the file ({file_size} bytes)")


def parse_header(cluster: bytes, file_size: int) -> Qcow2Header:
    """The header in ``cluster`` (the file's first bytes, up to one cluster)."""
    if len(cluster) < V2_LENGTH:
        raise ImageCorrupt(f"qcow2 header is truncated ({len(cluster)} bytes)")
    f = HEADER_V2.unpack_from(cluster)
    if f[0] != MAGIC:
        raise ImageCorrupt("not a qcow2 image (bad magic)")
    h = Qcow2Header(*f[1:])
    if h.version not in (2, 3):
        raise ImageUnsupported(f"qcow2 version {h.version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageCorrupt(f"qcow2 cluster_bits {h.cluster_bits} is out of range "
                           f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
    if len(cluster) < min(h.cluster_size, file_size):
        raise ImageCorrupt("qcow2 header cluster is truncated")
    if h.version == 3:
        _parse_v3(h, cluster)
    _check_features(h)
    _check_tables(h, file_size)
    _parse_extensions(h, cluster)
    _parse_backing_name(h, cluster)
    return h


def _parse_v3(h: Qcow2Header, cluster: bytes) -> None:
    if len(cluster) < V3_LENGTH:
        raise ImageCorrupt("qcow2 version 3 header is truncated")
    (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
     h.header_length) = HEADER_V3.unpack_from(cluster, V2_LENGTH)
    if h.header_length < V3_LENGTH or h.header_length % 8 \
            or h.header_length > min(h.cluster_size, len(cluster)):
        raise ImageCorrupt(f"qcow2 header_length {h.header_length} is invalid")
    if h.refcount_order > 6:
        raise ImageCorrupt(f"qcow2 refcount_order {h.refcount_order} is out of range (0..6)")
    if h.header_length > V3_LENGTH:
        h.compression_type = cluster[V3_LENGTH]


def _check_features(h: Qcow2Header) -> None:
    unknown = h.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise ImageUnsupported(f"qcow2 image uses an unknown incompatible feature (bit {bit})")
    if h.crypt_method:
        raise ImageUnsupported("encrypted qcow2 images are not supported")
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise ImageUnsupported("qcow2 images with an external data file are not supported")
    if h.incompatible & INCOMPAT_EXTL2:
        raise ImageUnsupported("qcow2 images with extended L2 entries are not supported")
    if h.incompatible & INCOMPAT_COMPRESSION and h.compression_type == COMPRESSION_ZLIB:
        raise ImageCorrupt("qcow2 compression type bit is set but compression_type is 0")
    if h.compression_type not in COMPRESSION_NAMES:
        raise ImageUnsupported(f"qcow2 compression type {h.compression_type} is not supported")
    if h.compression_type != COMPRESSION_ZLIB and not h.incompatible & INCOMPAT_COMPRESSION:
        raise ImageCorrupt("qcow2 compression_type is set without its incompatible bit")


def _check_tables(h: Qcow2Header, file_size: int) -> None:
    cs = h.cluster_size
    if h.size > MAX_SIZE:
        raise ImageCorrupt(f"qcow2 virtual size {h.size} is out of range")
    need_l1 = -(-h.size // (cs * h.l2_entries))
    if h.l1_size < need_l1:
        raise ImageCorrupt(f"qcow2 L1 table has {h.l1_size} entries, the disk size needs "
                           f"{need_l1}")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageCorrupt(f"qcow2 L1 table of {h.l1_size} entries is too large")
    if h.l1_size:
        _aligned(h.l1_table_offset, cs, "L1 table offset")
        _inside(h.l1_table_offset, h.l1_size * 8, file_size, "L1 table")
    if h.refcount_table_clusters == 0:
        raise ImageCorrupt("qcow2 refcount table has no clusters")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageCorrupt(f"qcow2 refcount table of {h.refcount_table_clusters} clusters "
                           "is too large")
    _aligned(h.refcount_table_offset, cs, "refcount table offset")
    if h.refcount_table_offset == 0:
        raise ImageCorrupt("qcow2 refcount table offset is 0 (it would overlap the header)")
    _inside(h.refcount_table_offset, h.refcount_table_clusters * cs, file_size,
            "refcount table")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageCorrupt(f"qcow2 image has too many snapshots ({h.nb_snapshots})")
    if h.nb_snapshots:
        _aligned(h.snapshots_offset, cs, "snapshot table offset")
        _inside(h.snapshots_offset, 40 * h.nb_snapshots, file_size, "snapshot table")


def _parse_extensions(h: Qcow2Header, cluster: bytes) -> None:
    pos = h.header_length if h.version == 3 else V2_LENGTH
    limit = min(len(cluster), h.cluster_size)
    if h.backing_file_offset and h.backing_file_offset < limit:
        limit = max(pos, h.backing_file_offset)
    seen: set[int] = set()
    while pos + 8 <= limit:
        kind, length = struct.unpack_from(">II", cluster, pos)
        if kind == EXT_END:
            break
        end = pos + 8 + length
        if end > limit:
            raise ImageCorrupt(f"qcow2 header extension {kind:#x} runs past the header "
                               "cluster")
        if kind in seen and kind != EXT_FEATURES:
            raise ImageCorrupt(f"qcow2 header extension {kind:#x} appears twice")
        seen.add(kind)
        _extension(h, kind, cluster[pos + 8:end])
        pos = end + (-length % 8)
    h.extensions_end = min(pos + 8, limit)


def _extension(h: Qcow2Header, kind: int, data: bytes) -> None:
    if kind == EXT_BACKING_FORMAT:
        h.backing_format = _text(data, "backing format name")
    elif kind == EXT_FEATURES:
        for i in range(0, len(data) - 47, 48):
            name = data[i + 2:i + 48].split(b"\0", 1)[0]
            h.feature_names[(data[i], data[i + 1])] = name.decode("ascii", "replace")
    elif kind == EXT_BITMAPS:
        if len(data) < 24:
            raise ImageCorrupt("qcow2 bitmaps extension is too short")
        nb, _, dsize, doff = struct.unpack_from(">IIQQ", data)
        h.bitmaps = (nb, dsize, doff)
    elif kind == EXT_CRYPTO:
        raise ImageUnsupported("encrypted qcow2 images are not supported")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageCorrupt(f"qcow2 {what} is not valid UTF-8") from None


def _parse_backing_name(h: Qcow2Header, cluster: bytes) -> None:
    if not h.backing_file_offset:
        return
    if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
        raise ImageCorrupt(f"qcow2 backing file name length {h.backing_file_size} is invalid")
    end = h.backing_file_offset + h.backing_file_size
    if end > min(len(cluster), h.cluster_size):
        raise ImageCorrupt("qcow2 backing file name lies outside the header cluster")
    h.backing_file = _text(cluster[h.backing_file_offset:end], "backing file name")
    if "\0" in h.backing_file:
        raise ImageCorrupt("qcow2 backing file name holds a NUL byte")


def encode_extensions(h: Qcow2Header) -> bytes:
    """The extension area dvmm writes: backing format, feature names, end."""
    out = b""
    if h.backing_format:
        name = h.backing_format.encode()
        out += struct.pack(">II", EXT_BACKING_FORMAT, len(name)) + name + bytes(-len(name) % 8)
    if h.version == 3:
        table = b"".join(struct.pack(">BB46s", t, b, n.encode()) for (t, b), n in (
            ((0, 0), "dirty bit"), ((0, 1), "corrupt bit"), ((0, 2), "external data file"),
            ((0, 3), "compression type"), ((0, 4), "extended L2 entries"),
            ((1, 0), "lazy refcounts"), ((2, 0), "bitmaps"), ((2, 1), "raw external data")))
        out += struct.pack(">II", EXT_FEATURES, len(table)) + table
    return out + struct.pack(">II", EXT_END, 0)
