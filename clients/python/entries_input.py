"""Entries to push, read from JSONL or CSV text (a file or stdin), lazily, in batches.

JSONL: one JSON value per non-empty line (an object, a string, a list...). CSV: a header row,
then one object per row keyed by the header; a cell that reads as a number (``187.2``, ``900``)
becomes a number, so formats such as ``ohlcv`` get numbers; other cells stay strings.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import msgspec

INPUT_KINDS = ("auto", "jsonl", "csv")
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
    return _csv_entries(stream) if kind == "csv" else _jsonl_entries(stream)


def batches(entries: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_entries(path: Path, kind: str) -> int:
    """How many entries a file holds (a first pass, for the progress bar)."""
    with path.open(encoding="utf-8", newline="") as stream:
        return sum(1 for _ in read_entries(stream, kind))


def _jsonl_entries(stream: TextIO) -> Iterator[Any]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield _json.decode(line)
        except msgspec.DecodeError as exc:
            raise InputError(f"line {number}: not valid JSON: {exc}") from exc


def _csv_entries(stream: TextIO) -> Iterator[dict[str, Any]]:
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise InputError(f"line 1: the CSV header needs distinct, non-empty names: {header}")
    for row in reader:
        if not row:
            continue
        if len(row) != len(names):
            raise InputError(
                f"line {reader.line_num}: {len(row)} fields, the header has {len(names)}"
            )
        yield {name: _cell(value) for name, value in zip(names, row, strict=True)}


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
