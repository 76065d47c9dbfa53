"""A typed face of :mod:`atheris` (it ships no type stubs).

Owns the one untyped import and the few calls the fuzz package makes:
:class:`Provider` is the part of ``atheris.FuzzedDataProvider`` the targets
use, :func:`instrumented` wraps ``atheris.instrument_imports`` and
:func:`fuzz` is ``atheris.Setup`` + ``atheris.Fuzz`` (which never returns:
libFuzzer exits the process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, cast


class Provider(Protocol):
    """What a target reads its input through (libFuzzer's FuzzedDataProvider)."""

    def ConsumeBytes(self, count: int) -> bytes: ...
    def ConsumeIntInRange(self, low: int, high: int) -> int: ...
    def ConsumeBool(self) -> bool: ...
    def remaining_bytes(self) -> int: ...


def _module() -> Any:
    import atheris  # type: ignore[import-untyped]

    return atheris


def available() -> str | None:
    """None when atheris imports, else why not (one line)."""
    try:
        _module()
    except ImportError as exc:
        return f"atheris is not installed ({exc}); pip install 'atheris>=2.3'"
    return None


def provider(data: bytes) -> Provider:
    return cast(Provider, _module().FuzzedDataProvider(data))


def instrumented(include: Sequence[str], exclude: Sequence[str] = ()
                 ) -> AbstractContextManager[object]:
    """Instrument (for coverage feedback) the modules imported inside."""
    return cast(AbstractContextManager[object],
                _module().instrument_imports(include=include, exclude=exclude))


def fuzz(argv: list[str], one_input: Callable[[bytes], None]) -> None:
    """Run libFuzzer with ``argv`` (its flags and corpus dirs); exits the process."""
    atheris = _module()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
