"""One QMP connection's protocol state: negotiation, then commands.

:class:`QmpSession` owns the lifecycle of qmp-spec.rst "Capabilities
Negotiation" (:class:`SessionState`): a new connection may only run
``qmp_capabilities``; every other command is ``CommandNotFound`` until it
succeeds, and asynchronous events are not delivered before.  After it,
``qmp_capabilities`` itself is ``CommandNotFound``.

It turns the connection's bytes into work items (:meth:`feed`, via
:mod:`.stream`) and each work item into exactly one reply (:meth:`process`,
via :mod:`.protocol` and the :class:`CommandTable`).  It does no I/O: the
server reads, writes and decides on which thread ``process`` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any, NamedTuple

from .protocol import (
    ArgType,
    ErrorClass,
    Param,
    QmpError,
    Request,
    check_arguments,
    failure,
    greeting,
    parse_request,
    request_id,
    success,
)
from .stream import JsonInputError, JsonStreamer

log = logging.getLogger("dvmm.qmp")

Handler = Callable[[dict[str, Any]], Any]


class Command(NamedTuple):
    name: str
    params: tuple[Param, ...]
    handler: Handler


class CommandTable:
    """Commands by name, each with the parameters it accepts."""

    def __init__(self, commands: list[Command] | None = None) -> None:
        self._commands: dict[str, Command] = {}
        for command in commands or []:
            self.add(command)

    def add(self, command: Command) -> None:
        self._commands[command.name] = command

    def names(self) -> list[str]:
        return ["qmp_capabilities", *self._commands]

    def run(self, request: Request) -> Any:
        command = self._commands.get(request.name)
        if command is None:
            raise QmpError(f"The command {_bounded(request.name)} has not been found",
                           ErrorClass.COMMAND_NOT_FOUND)
        check_arguments(command.params, request.arguments)
        return command.handler(request.arguments)


def _bounded(name: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in name[:64])


class SessionState(Enum):
    NEGOTIATING = "negotiating"
    COMMAND = "command"


_CAPABILITIES = (Param("enable", ArgType.STR_LIST, required=False),)
#: The capabilities the greeting offers (qmp-spec.rst "Capabilities"): none.
OFFERED: tuple[str, ...] = ()


class QmpSession:
    """Negotiation state and input parsing of one client."""

    def __init__(self, commands: CommandTable, max_size: int | None = None) -> None:
        self.commands = commands
        self.state = SessionState.NEGOTIATING
        self._stream = JsonStreamer() if max_size is None else JsonStreamer(max_size)

    @staticmethod
    def greeting() -> bytes:
        return greeting()

    @property
    def negotiated(self) -> bool:
        return self.state is SessionState.COMMAND

    def feed(self, data: bytes) -> list[Any]:
        """Work items completed by ``data``: decoded values or input errors."""
        return self._stream.feed(data)

    def process(self, item: Any) -> bytes:
        """One work item -> its one reply (a success or an error line)."""
        if isinstance(item, JsonInputError):
            return failure(QmpError(str(item)))
        rid = request_id(item)
        try:
            request = parse_request(item)
            return success(self._dispatch(request), request.id)
        except QmpError as exc:
            return failure(exc, rid)
        except Exception as exc:  # a command's bug: an error reply, the server goes on
            log.exception("QMP command failed")
            return failure(QmpError(f"internal error: {type(exc).__name__}: {exc}"), rid)

    def _dispatch(self, request: Request) -> Any:
        if self.state is SessionState.NEGOTIATING:
            if request.name != "qmp_capabilities":
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               ErrorClass.COMMAND_NOT_FOUND)
            check_arguments(_CAPABILITIES, request.arguments)
            for cap in request.arguments.get("enable", []):
                if cap not in OFFERED:
                    raise QmpError(f"Capability '{_bounded(cap)}' not available")
            self.state = SessionState.COMMAND
            return {}
        if request.name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           ErrorClass.COMMAND_NOT_FOUND)
        return self.commands.run(request)
