"""``dvmm run --config vm.toml``: a VM described by a TOML file, flags on top.

Owns the file's schema (:data:`KEYS`, :data:`TABLES`), reading it with the
standard library's ``tomllib``, checking every value as hostile input, and
merging it under the command line: a flag given on the command line wins
over the file, the file wins over the flag's default.  Lists (disks, NICs,
QMP sockets) are replaced as a whole: ``--disk`` on the command line means
exactly those disks.

Which flags were given is known without a second parse:
:func:`mark_defaults` wraps the defaults of the ``run`` parser's options in
:class:`Unset` markers, which argparse leaves in place for every option the
command line does not name; :func:`apply` then puts the file's value or the
real default there.  A value from the file goes through the same converter
(the option's ``type``) and the same parser (``parse_disk``...) as a flag,
and any error names the file, the key and what is wrong, on one line.
Relative paths in the file are relative to the file's directory.

The file format (every key optional; ``dvmm config dump`` prints a full one)::

    name = "web"                      uuid = "..."
    [machine]  memory = 512 (MiB), cpus = 2, hugepages = false, kvm = "/dev/kvm"
    [boot]     firmware = "seabios" | PATH, kernel, initrd, cmdline,
               menu = 2500 (ms), menu-key = "esc" | "f12"
    [[disk]]   image = PATH | socket = PATH, read-only, restart, runner
    [[net]]    tap | peer | socket, mac, queues, restart, runner
    [display]  vnc = "HOST:PORT", password-file, gpu = "virtio"
    [backends] restart, restart-limit = "N/SECONDS", runner, standby
    [serial]   output = "stdio" | "file:PATH" | "none", firmware-log, escape-char
    [qmp]      listen = ["unix:PATH", "tcp:HOST:PORT"]
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from dvmm_shared.cli import UsageError, one_line


class Key(NamedTuple):
    """One scalar key of the file: where it is, the option it sets, its kind."""

    section: str  # "" for the top level
    key: str
    dest: str
    kind: str     # "int", "bool", "str", "path", "serial", "list"
    low: int | None = None   # an int's range, checked here to name the key
    high: int | None = None


KEYS = (
    Key("", "name", "name", "str"), Key("", "uuid", "uuid", "str"),
    Key("machine", "memory", "memory", "int", 16, 1 << 30),
    Key("machine", "cpus", "cpus", "int", 1, 64),
    Key("machine", "hugepages", "hugepages", "bool"), Key("machine", "kvm", "kvm", "path"),
    Key("boot", "firmware", "firmware", "firmware"), Key("boot", "kernel", "kernel", "path"),
    Key("boot", "initrd", "initrd", "path"), Key("boot", "cmdline", "cmdline", "str"),
    Key("boot", "menu", "boot_menu", "int", 0, 0xFFFF),
    Key("boot", "menu-key", "boot_menu_key", "str"),
    Key("backends", "restart", "restart", "str"),
    Key("backends", "restart-limit", "restart_limit", "str"),
    Key("backends", "runner", "backend_runner", "str"),
    Key("backends", "standby", "standby", "bool"),
    Key("serial", "output", "serial", "serial"),
    Key("serial", "firmware-log", "firmware_log", "path"),
    Key("serial", "escape-char", "escape_char", "str"),
    Key("qmp", "listen", "qmp", "list"),
)

#: Tables whose keys become one composite option value (``--display vnc=...``)
#: or one list entry per ``[[table]]`` (``--disk IMAGE,opts``, ``--net k=v,...``).
TABLES: dict[str, dict[str, str]] = {
    "disk": {"image": "path", "socket": "path", "read-only": "bool", "restart": "str",
             "runner": "str"},
    "net": {"tap": "str", "peer": "path", "socket": "path", "mac": "str", "queues": "int",
            "restart": "str", "runner": "str"},
    "display": {"vnc": "str", "password-file": "path", "gpu": "str"},
}
COMPOSITE_DESTS = ("disk", "vhost_user_blk", "net", "display")
DESTS = tuple(k.dest for k in KEYS) + COMPOSITE_DESTS
#: Options that say one thing together: the disks are --disk and --vhost-user-blk.
GROUPS = (("disk", "vhost_user_blk"),)

Validators = dict[str, Callable[[str], Any]]


# -- knowing which flags were given ------------------------------------------------
class Unset:
    """An option's default, left by argparse when the flag was not given."""

    def __init__(self, value: Any, convert: Callable[[str], Any] | None) -> None:
        self.value = value
        self.convert = convert

    def resolve(self) -> Any:
        """The default as argparse would have produced it (strings converted)."""
        if isinstance(self.value, str) and self.convert is not None:
            return self.convert(self.value)
        return copy.copy(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


class UnsetList(list[Any]):
    """An ``append`` option's default: argparse copies it before appending,
    and the copy is a plain list, so a given flag never looks unset."""

    convert = None

    def __copy__(self) -> list[Any]:
        return list(self)

    def resolve(self) -> list[Any]:
        return list(self)


def mark_defaults(parser: argparse.ArgumentParser) -> None:
    """Wrap the defaults of the options a config file can set (call once,
    after every option was added)."""
    for action in parser._actions:
        if action.dest in DESTS:
            if isinstance(action.default, list):
                action.default = UnsetList(action.default)
            else:
                action.default = Unset(action.default, action.type)  # type: ignore[arg-type]


def is_unset(value: Any) -> bool:
    return isinstance(value, Unset | UnsetList)


def apply(args: argparse.Namespace, validators: Validators) -> argparse.Namespace:
    """Fill every option the command line did not give from ``args.config``
    (if any), else from its default.  UsageError (one line) for a bad file."""
    path = getattr(args, "config", None)
    from_file = load(path, args, validators) if path else {}
    for group in GROUPS:  # one flag of a group given: the whole group is the command line's
        if any(not is_unset(getattr(args, d, None)) for d in group if hasattr(args, d)):
            for dest in group:
                from_file.pop(dest, None)
    for dest in DESTS:
        value = getattr(args, dest, None)
        if isinstance(value, Unset | UnsetList):
            setattr(args, dest, from_file[dest] if dest in from_file else value.resolve())
    return args


# -- reading the file ---------------------------------------------------------------
class ConfigError(UsageError):
    """A bad config file: one line naming the file and the key."""


def load(path: str, args: argparse.Namespace, validators: Validators) -> dict[str, Any]:
    """The file's values by option ``dest``, checked and converted."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"--config {path}: {one_line(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _Reader(path, args, validators).read(data)


class _Reader:
    def __init__(self, path: str, args: argparse.Namespace, validators: Validators) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.args = args
        self.validators = validators
        self.out: dict[str, Any] = {}

    def fail(self, where: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {what}")

    def read(self, data: dict[str, Any]) -> dict[str, Any]:
        sections = {k.section for k in KEYS if k.section}
        for name, value in data.items():
            if name in TABLES:
                continue
            if name in sections:
                if not isinstance(value, dict):
                    raise self.fail(name, f"expected a table [{name}], got {_show(value)}")
                self._section(name, value)
            elif any(k.section == "" and k.key == name for k in KEYS):
                self._scalar(next(k for k in KEYS if k.section == "" and k.key == name), value)
            else:
                known = ", ".join(sorted([*sections, *TABLES, "name", "uuid"]))
                raise self.fail(name, f"unknown key (known at the top: {known})")
        self._disks(data.get("disk", []))
        self._nets(data.get("net", []))
        if "display" in data:
            self._display(data["display"])
        return self.out

    def _section(self, name: str, table: dict[str, Any]) -> None:
        keys = {k.key: k for k in KEYS if k.section == name}
        for key, value in table.items():
            if key not in keys:
                raise self.fail(f"{name}.{key}", f"unknown key (known in [{name}]: "
                                f"{', '.join(keys)})")
            self._scalar(keys[key], value)

    def _scalar(self, key: Key, value: Any) -> None:
        where = f"{key.section}.{key.key}" if key.section else key.key
        if not hasattr(self.args, key.dest):
            raise self.fail(where, "not supported by this dvmm run")
        value = self._typed(where, key.kind, value)
        if key.low is not None and key.high is not None and not key.low <= value <= key.high:
            raise self.fail(where, f"must be {key.low}..{key.high}, not {value}")
        marker = getattr(self.args, key.dest)
        convert = getattr(marker, "convert", None)
        if convert is not None and isinstance(value, str):
            try:
                value = convert(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise self.fail(where, str(exc)) from None
        self.out[key.dest] = value

    def _typed(self, where: str, kind: str, value: Any) -> Any:
        """Check a value's TOML type; paths become absolute (from the file's directory)."""
        if kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise self.fail(where, f"expected an integer, got {_show(value)}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(where, f"expected true or false, got {_show(value)}")
            return value
        if kind == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(where, f"expected a list of strings, got {_show(value)}")
            return [self._listen(v) for v in value]
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {_show(value)}")
        if "\0" in value:
            raise self.fail(where, "contains a NUL character")
        if kind == "path" or (kind == "firmware" and value != "seabios"):
            return os.path.join(self.base, value)
        if kind == "serial" and value.startswith("file:"):
            return "file:" + os.path.join(self.base, value[5:])
        return value

    def _listen(self, value: str) -> str:
        if value.startswith("unix:"):
            return "unix:" + os.path.join(self.base, value[5:])
        return value

    # -- tables ------------------------------------------------------------------
    def _entries(self, name: str, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(name, f"expected [[{name}]] tables, got {_show(value)}")
        return value

    def _fields(self, where: str, table: str, entry: dict[str, Any]) -> dict[str, Any]:
        schema = TABLES[table]
        fields = {}
        for key, value in entry.items():
            if key not in schema:
                raise self.fail(f"{where}.{key}", f"unknown key (known: {', '.join(schema)})")
            fields[key] = self._typed(f"{where}.{key}", schema[key], value)
        return fields

    def _check(self, where: str, kind: str, text: str) -> str:
        try:
            self.validators[kind](text)
        except UsageError as exc:
            raise self.fail(where, str(exc).partition(": ")[2] or str(exc)) from None
        return text

    def _disks(self, value: Any) -> None:
        disks, sockets = [], []
        for i, entry in enumerate(self._entries("disk", value)):
            where = f"disk[{i}]"
            f = self._fields(where, "disk", entry)
            if ("image" in f) == ("socket" in f):
                raise self.fail(where, "give exactly one of image= or socket=")
            if "socket" in f:
                if len(f) > 1:
                    raise self.fail(where, "a socket= disk takes no other key (its "
                                    "backend is external)")
                sockets.append(f["socket"])
                continue
            if not os.path.exists(f["image"]):
                raise self.fail(f"{where}.image", f"no such file {f['image']}")
            opts = [f["image"], *(["read-only"] if f.get("read-only") else []),
                    *(f"{k}={f[k]}" for k in ("restart", "runner") if k in f)]
            disks.append(self._check(where, "disk", ",".join(opts)))
        if value:
            self.out["disk"], self.out["vhost_user_blk"] = disks, sockets

    def _nets(self, value: Any) -> None:
        nets = []
        for i, entry in enumerate(self._entries("net", value)):
            f = self._fields(f"net[{i}]", "net", entry)
            nets.append(self._check(f"net[{i}]", "net",
                                    ",".join(f"{k}={v}" for k, v in f.items())))
        if value:
            self.out["net"] = nets

    def _display(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise self.fail("display", f"expected a table [display], got {_show(value)}")
        f = self._fields("display", "display", value)
        self.out["display"] = self._check("display", "display",
                                          ",".join(f"{k}={v}" for k, v in f.items()))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
