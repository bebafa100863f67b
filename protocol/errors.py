"""Typed errors shared by the daemon and its transports, with their wire codes."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    BAD_FRAME = "bad_frame"
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_SESSION = "unknown_session"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    CONTEXT_FULL = "context_full"
    INTERNAL = "internal"


# HTTP status for each code
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.CONTEXT_FULL: 507,
    ErrorCode.INTERNAL: 500,
}


class LiveLMError(Exception):
    """An error with a wire code; its message is safe to show to the client."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class InvalidRequest(LiveLMError):
    code = ErrorCode.INVALID_REQUEST


class Unauthorized(LiveLMError):
    code = ErrorCode.UNAUTHORIZED


class UnknownSession(LiveLMError):
    code = ErrorCode.UNKNOWN_SESSION


class TooLarge(LiveLMError):
    code = ErrorCode.TOO_LARGE


class Overloaded(LiveLMError):
    code = ErrorCode.OVERLOADED


class ContextFull(LiveLMError):
    code = ErrorCode.CONTEXT_FULL


class InternalError(LiveLMError):
    code = ErrorCode.INTERNAL


class ConfigError(Exception):
    """The daemon's configuration is invalid; raised at startup with a message for the operator."""


class ModelLoadError(Exception):
    """A model folder or preset could not be loaded; the message says what is wrong."""
