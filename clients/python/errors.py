"""Errors a client raises: the daemon's typed errors by wire code, and connection failures.

A reply ``{"type": "error", "code", "message"}`` (or an HTTP error body) becomes the matching
``livelm.protocol.errors`` class, so ``except UnknownSession`` works on every transport.
"""

from __future__ import annotations

import os

from livelm.protocol.errors import (
    ContextFull,
    InternalError,
    InvalidRequest,
    LiveLMError,
    Overloaded,
    TooLarge,
    Unauthorized,
    UnknownSession,
)
from livelm.protocol.framing import BadFrame


class UnknownErrorCode(LiveLMError):
    """An error whose code this client does not know (a newer daemon); ``wire_code`` holds it."""

    def __init__(self, wire_code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{message} (code {wire_code!r})", retry_after=retry_after)
        self.wire_code = wire_code


class DaemonUnreachable(ConnectionError):
    """No connection could be made to the daemon (not running, wrong host or port)."""


class ConnectionLost(ConnectionError):
    """The connection closed while requests were pending, or before this request was sent."""


class InvalidReply(Exception):
    """The daemon sent something that does not follow PROTOCOL.md."""


_BY_CODE: dict[str, type[LiveLMError]] = {
    cls.code.value: cls
    for cls in (
        BadFrame,
        InvalidRequest,
        Unauthorized,
        UnknownSession,
        TooLarge,
        Overloaded,
        ContextFull,
        InternalError,
    )
}


def error_from(code: object, message: object, retry_after: float | None = None) -> LiveLMError:
    """The typed exception for an error reply's ``code`` and ``message``."""
    text = message if isinstance(message, str) else repr(message)
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        return UnknownErrorCode(str(code), text, retry_after=retry_after)
    return cls(text, retry_after=retry_after)


def error_from_message(message: dict) -> LiveLMError:
    """The typed exception for an ``error`` message of the TCP/WebSocket protocol."""
    retry = message.get("retry_after")
    retry_after = float(retry) if isinstance(retry, int | float) else None
    return error_from(message.get("code"), message.get("message", ""), retry_after)


def os_reason(exc: BaseException) -> str:
    """A short reason for a failed connect: "Connection refused" rather than the call repr."""
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    return str(exc) or type(exc).__name__
