"""Structured logging to stderr: JSON lines or plain text, both carrying ``extra`` fields.

``setup_logging`` configures the root logger once at startup; modules log through
``get_logger(__name__)`` and pass context as ``extra={...}``. aiohttp's access log goes through
``AccessLogger`` at DEBUG level, so it is silent unless ``log_level`` is ``debug``.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import msgspec
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

ACCESS_LOGGER = "livelm.access"

# attributes every LogRecord has; anything else on a record came from ``extra``
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) in the chosen format."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _timestamp(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _as_text(value: Any) -> str:
    """msgspec's fallback for values it cannot encode (paths, devices, dtypes...)."""
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, exc when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(entry, enc_hook=_as_text).decode()


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.000Z INFO livelm.daemon.app: msg key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname:<7} {record.name}: "
            f"{record.getMessage()}"
        )
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        return msgspec.json.encode(value, enc_hook=_as_text).decode()
    text = str(value)
    return repr(text) if (" " in text or not text) else text


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log as structured DEBUG records (pass as ``access_log_class``)."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 3),
                "remote": request.remote,
            },
        )
