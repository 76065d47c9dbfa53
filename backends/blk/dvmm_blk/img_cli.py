"""``dvmm img``: create, inspect, check, convert disk images (qemu-img's verbs).

Owns the command line of the image tool: ``create`` (raw, qcow2),
``info`` (every format dvmm reads, ``--backing-chain``), ``check`` (qcow2;
``-r leaks|all`` repairs), ``convert`` (any format dvmm reads to raw or
qcow2, ``-l`` a snapshot) and ``snapshot -l``.  Output and exit statuses
follow qemu-img's (``--output json`` prints its JSON objects), so scripts
written for one work with the other.  The formats themselves are
:mod:`dvmm_blk.formats`'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dvmm_shared.cli import UsageError, parse_size

from .formats import FORMATS, BlockImage, ImageError, open_image
from .formats.info import (
    check_human,
    check_json,
    check_status,
    human_info,
    image_info,
    snapshot_json,
    snapshot_table,
)
from .formats.qcow2_create import Qcow2Options, create_qcow2
from .formats.qcow2_image import Qcow2Image

CREATE_FORMATS = ("raw", "qcow2")
CONVERT_CHUNK = 1 << 20
#: qemu-img check's status for a format without checks.
CHECK_UNSUPPORTED = 63


def _open(path: str, fmt: str, read_only: bool = True, **kw: Any) -> BlockImage:
    try:
        return open_image(path, fmt, read_only, lock=not read_only, **kw)
    except ImageError as exc:
        raise UsageError(f"could not open '{path}': {exc}") from None


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=4))


# -- create -----------------------------------------------------------------------------
def parse_options(text: str | None) -> dict[str, str]:
    """``-o key=value,key=value``."""
    out: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"option {item!r} has no value (expected key=value)")
        out[key.strip()] = value.strip()
    return out


def qcow2_options(size: int, opts: dict[str, str], backing: str | None,
                  backing_fmt: str | None) -> Qcow2Options:
    o = Qcow2Options(size, backing_file=backing, backing_format=backing_fmt)
    for key, value in opts.items():
        if key == "cluster_size":
            o.cluster_size = parse_size(value)
        elif key == "compat":
            if value not in ("0.10", "v2", "1.1", "v3"):
                raise UsageError(f"compat must be 0.10 or 1.1, not {value!r}")
            o.version = 2 if value in ("0.10", "v2") else 3
        elif key == "refcount_bits":
            o.refcount_bits = int(value)
        elif key == "lazy_refcounts":
            o.lazy_refcounts = value in ("on", "true", "yes")
        elif key == "compression_type":
            o.compression_type = value
        elif key == "backing_file":
            o.backing_file = value
        elif key == "backing_fmt":
            o.backing_format = value
        elif key in ("extended_l2", "preallocation") and value in ("off", "false"):
            continue
        else:
            raise UsageError(f"qcow2 option {key}={value} is not supported")
    return o


def run_create(args: argparse.Namespace) -> int:
    opts = parse_options(args.options)
    backing = args.backing or opts.get("backing_file")
    size = args.size
    if size is None:
        if not backing:
            raise UsageError("an image size is needed (or a backing file to take it from)")
        base = backing if os.path.isabs(backing) else os.path.join(
            os.path.dirname(args.file), backing)
        with _open(base, args.backing_format or "auto") as img:
            size = img.size
    if args.format == "raw":
        if opts or backing:
            raise UsageError("raw images take no options and no backing file")
        with open(args.file, "wb") as f:
            f.truncate(size)
        desc = f"fmt=raw size={size}"
    else:
        o = qcow2_options(size, opts, backing, args.backing_format)
        try:
            create_qcow2(args.file, o)
        except (ImageError, OSError) as exc:
            raise UsageError(f"{args.file}: {exc}") from None
        desc = (f"fmt=qcow2 cluster_size={o.cluster_size} extended_l2=off "
                f"compression_type={o.compression_type} size={size}"
                + (f" backing_file={o.backing_file}" if o.backing_file else "")
                + (f" backing_fmt={o.backing_format}" if o.backing_format else "")
                + (" compat=0.10" if o.version == 2 else "")
                + (f" lazy_refcounts={'on' if o.lazy_refcounts else 'off'}"
                   if o.version == 3 else "") + f" refcount_bits={o.refcount_bits}")
    if not args.quiet:
        print(f"Formatting '{args.file}', {desc}")
    return 0


# -- info, check, snapshot ----------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    with _open(args.file, args.format) as img:
        chain = img.chain() if args.backing_chain else [img]
        infos = [image_info(i) for i in chain]
    if args.output == "json":
        _print_json(infos if args.backing_chain else infos[0])
    else:
        print("\n".join(human_info(i) for i in infos), end="")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from .formats.qcow2_check import check, repair

    with _open(args.file, args.format, read_only=args.repair is None) as img:
        if not isinstance(img, Qcow2Image):
            print(f"dvmm img: {img.format_name} images do not support checks",
                  file=sys.stderr)
            return CHECK_UNSUPPORTED
        try:
            result = (check(img)[0] if args.repair is None
                      else repair(img, fix_errors=args.repair == "all"))
        except ImageError as exc:
            raise UsageError(f"check of '{args.file}' failed: {exc}") from None
    for line in result.messages:
        print(line, file=sys.stderr)
    if args.output == "json":
        _print_json(check_json(result, args.file, "qcow2"))
    else:
        print(check_human(result, args.repair is not None), end="")
    return check_status(result)


def run_snapshot(args: argparse.Namespace) -> int:
    with _open(args.file, args.format) as img:
        snaps = img.snapshots if isinstance(img, Qcow2Image) else []
        listed = [snapshot_json(s) for s in snaps]
    if args.output == "json":
        _print_json(listed)
    elif listed:
        print(snapshot_table(listed), end="")
    return 0


# -- convert ------------------------------------------------------------------------------
def run_convert(args: argparse.Namespace) -> int:
    with _open(args.source, args.format, snapshot=args.snapshot) as src:
        size = src.size
        if args.output_format == "raw":
            with open(args.target, "wb") as f:
                f.truncate(size)
            dst = _open(args.target, "raw", read_only=False)
        else:
            opts = qcow2_options(size, parse_options(args.options), None, None)
            create_qcow2(args.target, opts)
            dst = _open(args.target, "qcow2", read_only=False)
            if isinstance(dst, Qcow2Image):
                dst.sync_metadata = False  # one flush at the end is enough here
        with dst:
            copy_data(src, dst)
            dst.flush()
    return 0


def copy_data(src: BlockImage, dst: BlockImage) -> None:
    """Every non-zero chunk of ``src`` into ``dst`` (zeros stay holes)."""
    buf = bytearray(CONVERT_CHUNK)
    zero = bytes(CONVERT_CHUNK)
    for offset in range(0, src.size, CONVERT_CHUNK):
        n = min(CONVERT_CHUNK, src.size - offset)
        view = memoryview(buf)[:n]
        src.read(offset, [view])
        if view != zero[:n]:
            dst.write(offset, [view])


# -- the parser ------------------------------------------------------------------------------
def _size(text: str) -> int:
    return parse_size(text, ("K", "M", "G", "T", "P"))


def add_parser(sub: Any) -> None:
    """Register ``dvmm img`` and its verbs."""
    p = sub.add_parser("img", help="create, inspect, check and convert disk images",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    fmt_help = "the image's format (default: detected)"

    c = verbs.add_parser("create", help="create an empty image")
    c.add_argument("-f", dest="format", choices=CREATE_FORMATS, default="raw")
    c.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (qcow2)")
    c.add_argument("-F", dest="backing_format", choices=FORMATS[1:], help="its format")
    c.add_argument("-o", dest="options", metavar="OPTS", help="key=value,... (qemu-img's)")
    c.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    c.add_argument("file")
    c.add_argument("size", nargs="?", type=_size, help="bytes, or with K/M/G/T")
    c.set_defaults(func=run_create)

    i = verbs.add_parser("info", help="show an image's format, sizes and backing file")
    i.add_argument("-f", dest="format", choices=FORMATS, default="auto", help=fmt_help)
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("--backing-chain", action="store_true", help="every image of the chain")
    i.add_argument("file")
    i.set_defaults(func=run_info)

    k = verbs.add_parser("check", help="check a qcow2 image's consistency")
    k.add_argument("-f", dest="format", choices=FORMATS, default="auto", help=fmt_help)
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair what is found")
    k.add_argument("file")
    k.set_defaults(func=run_check)

    v = verbs.add_parser("convert", help="copy an image into a new raw or qcow2 image")
    v.add_argument("-f", dest="format", choices=FORMATS, default="auto", help=fmt_help)
    v.add_argument("-O", dest="output_format", choices=CREATE_FORMATS, default="raw")
    v.add_argument("-o", dest="options", metavar="OPTS", help="qcow2 options for the target")
    v.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", help="convert this snapshot")
    v.add_argument("source")
    v.add_argument("target")
    v.set_defaults(func=run_convert)

    s = verbs.add_parser("snapshot", help="list a qcow2 image's internal snapshots")
    s.add_argument("-l", dest="list", action="store_true", required=True,
                   help="list the snapshots (the only action)")
    s.add_argument("-f", dest="format", choices=FORMATS, default="auto", help=fmt_help)
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.add_argument("file")
    s.set_defaults(func=run_snapshot)
