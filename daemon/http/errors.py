"""Every failure of an HTTP request becomes a JSON error body with the right status.

Body shape: ``{"error": {"message", "type", "code"}}`` (plus OpenAI's ``param`` under its
paths); under ``/v1/messages`` Anthropic's
``{"type": "error", "error": {"type", "message"}}``. Overloaded replies carry ``Retry-After``.
Unexpected exceptions are logged with their traceback and answered with a generic 500.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from livelm.daemon.logs import get_logger
from livelm.protocol.errors import ErrorCode, LiveLMError

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_RETRY_AFTER = 1.0  # seconds, when an Overloaded error names none
ANTHROPIC_PREFIX = "/v1/messages"
OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/models")
CLIENT_CLOSED = 499  # nginx's status for a request whose client disconnected

# code -> the "type" an OpenAI-style client expects
_OPENAI_TYPES = {
    ErrorCode.BAD_FRAME: "invalid_request_error",
    ErrorCode.INVALID_REQUEST: "invalid_request_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.UNKNOWN_SESSION: "not_found_error",
    ErrorCode.TOO_LARGE: "invalid_request_error",
    ErrorCode.OVERLOADED: "overloaded_error",
    ErrorCode.CONTEXT_FULL: "context_full_error",
    ErrorCode.INTERNAL: "server_error",
}

# status -> Anthropic's error type
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class HttpError(Exception):
    """A reply that is decided: status, wire code, safe message, extra headers."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        openai_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.openai_code = openai_code  # the code OpenAI's clients look for, under its paths


def classify(exc: BaseException, request: web.BaseRequest) -> HttpError:
    """Decide the reply for an exception raised while serving ``request``."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, LiveLMError):
        return _from_livelm(exc)
    if isinstance(exc, msgspec.ValidationError | msgspec.DecodeError):
        return HttpError(400, ErrorCode.INVALID_REQUEST, f"invalid request body: {exc}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.client_max_size
        return HttpError(413, ErrorCode.TOO_LARGE, f"request body exceeds {limit} bytes")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = ", ".join(sorted(exc.allowed_methods))
        message = f"method {request.method} is not allowed on {request.path}; allowed: {allow}"
        return HttpError(405, ErrorCode.INVALID_REQUEST, message, {"Allow": allow})
    if isinstance(exc, web.HTTPNotFound):
        message = f"no route for {request.method} {request.path}"
        return HttpError(404, ErrorCode.INVALID_REQUEST, message)
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return HttpError(exc.status, _code_for_status(exc.status), exc.reason)
    return HttpError(500, ErrorCode.INTERNAL, "internal server error")


def _from_livelm(exc: LiveLMError) -> HttpError:
    headers = {}
    if exc.code is ErrorCode.OVERLOADED:
        seconds = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return HttpError(exc.http_status, exc.code, exc.message, headers)


def _code_for_status(status: int) -> ErrorCode:
    if status == 401:
        return ErrorCode.UNAUTHORIZED
    if status == 413:
        return ErrorCode.TOO_LARGE
    if status in (429, 503):
        return ErrorCode.OVERLOADED
    return ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_REQUEST


def error_body(error: HttpError, path: str) -> bytes:
    if path.startswith(ANTHROPIC_PREFIX):
        kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
        return msgspec.json.encode(
            {"type": "error", "error": {"type": kind, "message": error.message}}
        )
    kind = _OPENAI_TYPES[error.code]
    body = {"message": error.message, "type": kind, "code": error.code.value}
    if path.startswith(OPENAI_PREFIXES):
        body["param"] = None  # OpenAI's shape names the field; our messages do that instead
        body["code"] = error.openai_code or body["code"]
    return msgspec.json.encode({"error": body})


def error_response(error: HttpError, path: str) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(error, path),
        content_type="application/json",
        headers=error.headers,
    )


# exceptions that are part of serving (client errors, capacity, deliberate engine errors)
_EXPECTED = (HttpError, LiveLMError, msgspec.ValidationError, msgspec.DecodeError)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through
            raise
        return error_response(classify(exc, request), request.path)
    except ConnectionResetError:
        # the client went away; nothing can be sent, 499 is only for the metrics and logs
        log.debug("client went away during %s %s", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED, reason="Client Closed Request")
    except Exception as exc:
        if not isinstance(exc, _EXPECTED):
            log.exception(
                "unhandled error serving %s %s",
                request.method,
                request.path,
                extra={"method": request.method, "path": request.path},
            )
        return error_response(classify(exc, request), request.path)
