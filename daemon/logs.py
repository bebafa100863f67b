"""Structured logging to stderr: JSON lines or plain text, both carrying ``extra`` fields.

``setup_logging`` configures the root logger once at startup; modules log through
``get_logger(__name__)`` and pass context as ``extra={...}``. aiohttp's access log goes through
``AccessLogger`` at DEBUG level, so it is silent unless ``log_level`` is ``debug``. With
``syslog_prefix`` every line starts with ``<N>``, the record's syslog priority: journald reads it
from a service's stderr (``SyslogLevelPrefix=yes``, systemd's default) and files the line at that
priority instead of the unit's default (info).
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


def setup_logging(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    syslog_prefix: bool = False,
) -> None:
    """Send every logger's records to ``stream`` (stderr) in the chosen format."""
    handler = ConsoleHandler(sys.stderr if stream is None else stream, fmt)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(PriorityPrefixFormatter(formatter) if syslog_prefix else formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


class ConsoleHandler(logging.StreamHandler):
    """The daemon's one handler; it knows its format, so that progress reports can follow it
    (``console_format``)."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        super().__init__(stream)
        self.fmt = fmt


def console_format(stream: TextIO) -> str | None:
    """The format ("json" or "text") ``setup_logging`` set for records written to ``stream``;
    None when it did not (library use, benchmarks, tests)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleHandler) and handler.stream is stream:
            return handler.fmt
    return None


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


# sd-daemon(3) priorities: <2> critical, <3> error, <4> warning, <6> info, <7> debug
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


class PriorityPrefixFormatter(logging.Formatter):
    """Prefixes every line of ``inner``'s output with ``<N>``: journald reads each line of a
    service's output as one entry, so a traceback's lines keep the record's priority too."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


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
