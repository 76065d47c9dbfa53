"""``dvmm config dump [RUN OPTIONS]``: the effective VM configuration as TOML.

Owns turning a ``dvmm run`` command line (with or without ``--config``)
into the file :mod:`.config_file` reads: every key, defaults included,
paths absolute, so that ``dvmm run --config DUMPED`` runs the same VM as
the command line did, and dumping that file again prints the same text.
The TOML writer is a small one (the standard library only reads TOML):
strings are written as basic strings with JSON's escapes, which TOML shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DESCRIPTION = """\
Print the configuration a `dvmm run` command line describes, as the TOML file
`dvmm run --config FILE` reads: every setting, defaults included.  It takes
`dvmm run`'s options (a --config file among them: the flags override it).
"""

EPILOG = """\
examples:
  dvmm config dump --disk demo.img --memory 512 --qmp unix:/tmp/vm.qmp > vm.toml
  dvmm run --config vm.toml --cpus 2        (the file, with 2 vCPUs)
  dvmm config dump --config vm.toml --cpus 2
"""


class _AsDump:
    """Lets ``run.add_parser`` build its options into the ``dump`` verb."""

    def __init__(self, verbs: Any) -> None:
        self.verbs = verbs

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.verbs.add_parser(
            "dump", help="print the effective configuration as TOML", description=DESCRIPTION,
            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        return parser


def add_parser(sub: Any) -> None:
    """``dvmm config dump``: the ``dump`` verb takes exactly ``dvmm run``'s options."""
    from . import run

    p = sub.add_parser("config", help="VM configuration files (dump the effective one as TOML)",
                       description="VM configuration files for `dvmm run --config FILE`.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    run.add_parser(_AsDump(verbs))  # type: ignore[arg-type]
    verbs.choices["dump"].set_defaults(func=run_dump)


def run_dump(args: argparse.Namespace) -> int:
    from . import run

    sys.stdout.write(to_toml(run.resolve_args(args)))
    return 0


# -- from the options back to the file's structure -----------------------------------
def _opts(text: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (item.partition("=") for item in text.split(",") if item)]


def structure(args: argparse.Namespace) -> dict[str, Any]:
    """The file's tables from resolved ``dvmm run`` options."""
    def str_or_none(value: Any) -> Any:
        return None if value is None else str(getattr(value, "value", value))

    firmware = args.firmware if (args.firmware or args.kernel) else "seabios"
    limit = args.restart_limit
    doc: dict[str, Any] = {
        "name": args.name, "uuid": args.uuid,
        "machine": {"memory": args.memory, "cpus": args.cpus, "hugepages": args.hugepages,
                    "kvm": args.kvm},
        "boot": {"firmware": firmware, "kernel": args.kernel, "initrd": args.initrd,
                 "cmdline": args.cmdline, "menu": args.boot_menu,
                 "menu-key": args.boot_menu_key},
        "backends": {"restart": str_or_none(args.restart),
                     "restart-limit": f"{limit[0]}/{limit[1]:g}",
                     "runner": str_or_none(getattr(args, "backend_runner", None)),
                     "standby": args.standby},
        "serial": {"output": args.serial, "firmware-log": args.firmware_log,
                   "escape-char": _escape(getattr(args, "escape_char", None))},
        "qmp": {"listen": [_absolute(a) for a in args.qmp]},
        "disk": [_disk(d) for d in args.disk] + [{"socket": s} for s in args.vhost_user_blk],
        "net": [{k: int(v) if k == "queues" else v for k, v in _opts(n)} for n in args.net],
    }
    if args.display:
        doc["display"] = dict(_opts(args.display))
    return doc


def _escape(code: int | None) -> str | None:
    from .console import key_name

    return None if code is None else key_name(code).lower()


def _absolute(address: str) -> str:
    """A ``unix:`` QMP address with an absolute path (the dump may be read elsewhere)."""
    if address.startswith("unix:"):
        path, comma, opts = address[5:].partition(",")
        return f"unix:{os.path.abspath(path)}{comma}{opts}"
    return address


def _disk(text: str) -> dict[str, Any]:
    path, _, rest = text.partition(",")
    entry: dict[str, Any] = {"image": os.path.abspath(path)}
    for key, value in _opts(rest):
        if key in ("read-only", "ro", "readonly"):
            entry["read-only"] = True
        else:
            entry[key] = value
    return entry


# -- writing TOML -----------------------------------------------------------------
def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: the same escapes as JSON


def _table(lines: list[str], header: str, table: dict[str, Any]) -> None:
    lines.append(header)
    lines.extend(f"{k} = {_value(v)}" for k, v in table.items() if v is not None)
    lines.append("")


def to_toml(args: argparse.Namespace) -> str:
    doc = structure(args)
    lines = ["# dvmm VM configuration: dvmm run --config FILE (flags override it)", ""]
    for key in ("name", "uuid"):
        if doc[key] is not None:
            lines.append(f"{key} = {_value(doc[key])}")
    if lines[-1]:
        lines.append("")
    for section in ("machine", "boot", "backends", "serial", "qmp"):
        _table(lines, f"[{section}]", doc[section])
    if "display" in doc:
        _table(lines, "[display]", doc["display"])
    for kind in ("disk", "net"):
        for entry in doc[kind]:
            _table(lines, f"[[{kind}]]", entry)
    return "\n".join(lines).rstrip("\n") + "\n"
