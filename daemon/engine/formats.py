"""Renders pushed entries to text, one line each, deterministically per the session's format.

A string entry is taken as text in every format. Objects are rendered by the format:
``json`` as compact JSON with sorted keys, ``ohlcv`` as one market-data line with fields in a
fixed order, ``kv`` as ``key=value`` pairs in the order given.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import msgspec

from livelm.protocol.errors import InvalidRequest

_json = msgspec.json.Encoder(order="sorted")

# canonical field -> accepted spellings, in rendering order
_OHLCV_FIELDS: dict[str, tuple[str, ...]] = {
    "t": ("t", "ts", "time", "timestamp", "date"),
    "o": ("o", "open"),
    "h": ("h", "high"),
    "l": ("l", "low"),
    "c": ("c", "close"),
    "v": ("v", "volume", "vol"),
}
_SYMBOL_KEYS = ("s", "symbol", "sym", "ticker")


def render_entry(entry: Any, fmt: str, index: int) -> str:
    try:
        return _render(entry, fmt, index)
    except RecursionError as exc:
        raise InvalidRequest(f"data[{index}]: nested too deeply") from exc
    except TypeError as exc:  # a MessagePack ext value, which has no text form
        raise InvalidRequest(f"data[{index}]: cannot be rendered as text: {exc}") from exc


def _render(entry: Any, fmt: str, index: int) -> str:
    if isinstance(entry, str):
        return _line(entry)
    if fmt == "text":
        raise InvalidRequest(f"data[{index}]: format 'text' takes strings, got {_kind(entry)}")
    if fmt == "json":
        return _line(_json.encode(entry).decode())
    if fmt == "ohlcv":
        return _line(_render_ohlcv(entry, index))
    if fmt == "kv":
        return _line(_render_kv(entry, index))
    raise InvalidRequest(f"unknown format {fmt!r}")


def _line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _number(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{where}: expected a number, got {_kind(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{where}: expected a finite number")
        return _shortest(value)
    return str(value)


def _shortest(value: float) -> str:
    """The fewest digits that read back as ``value`` (no rounding of prices or volumes),
    positional unless the magnitude is extreme; whole numbers without ``.0``."""
    text = repr(value)
    if "e" in text and -7 <= Decimal(text).adjusted() <= 21:
        text = format(Decimal(text), "f")
    return text.removesuffix(".0")


def _render_ohlcv(entry: Any, index: int) -> str:
    where = f"data[{index}]"
    if isinstance(entry, list):
        if len(entry) != 6:
            raise InvalidRequest(f"{where}: an ohlcv list has 6 values [t, o, h, l, c, v]")
        values = dict(zip(_OHLCV_FIELDS, entry, strict=True))
        symbol = None
    elif isinstance(entry, dict):
        values = {f: _pick(entry, names, f"{where}.{f}") for f, names in _OHLCV_FIELDS.items()}
        symbol = _pick(entry, _SYMBOL_KEYS, f"{where}.symbol", required=False)
    else:
        raise InvalidRequest(f"{where}: format 'ohlcv' takes objects or 6-value lists")
    parts = [] if symbol is None else [_label(symbol, f"{where}.symbol")]
    parts.append(_label(values["t"], f"{where}.t"))
    parts += [f"{f}={_number(values[f], f'{where}.{f}')}" for f in "ohlcv"]
    return " ".join(parts)


def _label(value: Any, where: str) -> str:
    """A time or a symbol: a one-line string, or a number."""
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise InvalidRequest(f"{where}: must be one line (a record renders as one line)")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{where}: expected a string or a number, got {_kind(value)}")
    return _number(value, where)


def _pick(entry: dict, names: tuple[str, ...], where: str, required: bool = True) -> Any:
    present = [name for name in names if name in entry]
    if len(present) > 1:
        raise InvalidRequest(f"{where}: given as {' and '.join(present)}; give one of them")
    if present:
        return entry[present[0]]
    if required:
        raise InvalidRequest(f"{where}: missing (accepted keys: {', '.join(names)})")
    return None


def _render_kv(entry: Any, index: int) -> str:
    if not isinstance(entry, dict):
        raise InvalidRequest(f"data[{index}]: format 'kv' takes objects")
    return " ".join(f"{k}={_scalar(v)}" for k, v in entry.items())


def _scalar(value: Any) -> str:
    """A string as it is, unless a line break would split the record (then quoted as JSON,
    which escapes it); anything else as compact JSON."""
    if isinstance(value, str) and "\n" not in value and "\r" not in value:
        return value
    return _json.encode(value).decode()
