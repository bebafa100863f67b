"""Entries to push, read from JSONL or CSV text (a file or stdin), lazily, in batches.

JSONL: one JSON value per non-empty line (an object, a string, a list...). CSV: a header row,
then one object per row keyed by the header; a cell that reads as a number (``187.2``, ``900``)
becomes a number, so formats such as ``ohlcv`` get numbers; other cells stay strings.
Files are read as UTF-8 with or without a byte order mark (Excel writes one).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import msgspec

INPUT_KINDS = ("auto", "jsonl", "csv")
ENCODING = "utf-8-sig"  # UTF-8; a leading byte order mark is dropped
_CSV_SUFFIXES = {".csv"}

_json = msgspec.json.Decoder()


class InputError(ValueError):
    """The input is not valid JSONL/CSV; the message names the line."""


def input_kind(path: str, requested: str) -> str:
    """``jsonl`` or ``csv``: as requested, else by the file's suffix (stdin: jsonl)."""
    if requested != "auto":
        return requested
    return "csv" if Path(path).suffix.lower() in _CSV_SUFFIXES else "jsonl"


def read_entries(stream: TextIO, kind: str) -> Iterator[Any]:
    return (entry for _, entry in numbered_entries(stream, kind))


def numbered_entries(stream: TextIO, kind: str) -> Iterator[tuple[int, Any]]:
    """``(line, entry)``: each entry with the number of the line it starts on."""
    return _csv_entries(stream) if kind == "csv" else _jsonl_entries(stream)


def open_input(path: Path) -> TextIO:
    return path.open(encoding=ENCODING, newline="")


def batches(entries: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_entries(path: Path, kind: str, check: Callable[[Any], object] | None = None) -> int:
    """How many entries a file holds (a first pass, for the progress bar), each passed to
    ``check`` (which raises ``InputError`` for one that cannot be sent)."""
    with open_input(path) as stream:
        entries = numbered_entries(stream, kind)
        if check is not None:
            entries = checked(entries, check)
        return sum(1 for _ in entries)


def checked(
    entries: Iterable[tuple[int, Any]], check: Callable[[Any], object]
) -> Iterator[tuple[int, Any]]:
    """The entries, each passed to ``check`` first; its ``ValueError`` names the line."""
    for number, entry in entries:
        try:
            check(entry)
        except ValueError as exc:
            raise InputError(f"line {number}: {exc}") from exc
        yield number, entry


def _jsonl_entries(stream: TextIO) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield number, _json.decode(line)
        except msgspec.DecodeError as exc:
            raise InputError(f"line {number}: not valid JSON: {exc}") from exc


def _csv_entries(stream: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise InputError(f"line 1: the CSV header needs distinct, non-empty names: {header}")
    end = reader.line_num  # the line a row ends on; it starts after the previous one
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row:
            continue
        if len(row) != len(names):
            raise InputError(f"line {start}: {len(row)} fields, the header has {len(names)}")
        yield start, {name: _cell(value) for name, value in zip(names, row, strict=True)}


def _cell(text: str) -> Any:
    value = text.strip()
    if not value or "_" in value:  # Python reads "1_000" as a number; CSV writers do not mean it
        return text
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if isinstance(number, float) and not math.isfinite(number):
            return text  # "nan", "inf" are words here, not numbers
        return number
    return text
