"""How pushed entries become lines of text, per the session's format: deterministic, one line
per record, and a clear error naming the entry and field for anything that does not fit."""

from __future__ import annotations

import pytest

from livelm.daemon.engine.formats import render_entry
from livelm.protocol.errors import InvalidRequest

BAR = {"symbol": "AAPL", "t": "09:30", "o": 187.1, "h": 187.4, "l": 186.9, "c": 187.2, "v": 1200}


def test_strings_are_text_in_every_format() -> None:
    for fmt in ("text", "json", "ohlcv", "kv"):
        assert render_entry("news: up 2%", fmt, 0) == "news: up 2%\n"
    assert render_entry("two\nlines\n", "text", 0) == "two\nlines\n"  # text may span lines


def test_ohlcv_objects_and_lists() -> None:
    line = "AAPL 09:30 o=187.1 h=187.4 l=186.9 c=187.2 v=1200\n"
    assert render_entry(BAR, "ohlcv", 0) == line
    spelled = {"ticker": "AAPL", "time": "09:30", "open": 187.1, "high": 187.4, "low": 186.9,
               "close": 187.2, "volume": 1200}
    assert render_entry(spelled, "ohlcv", 0) == line
    assert render_entry([1717, 1, 2, 0.5, 1.5, 10], "ohlcv", 0) == "1717 o=1 h=2 l=0.5 c=1.5 v=10\n"


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (BAR | {"o": "187.1"}, "data[3].o: expected a number, got str"),
        (BAR | {"v": True}, "data[3].v: expected a number, got bool"),
        (BAR | {"c": float("nan")}, "data[3].c: expected a finite number"),
        ({k: v for k, v in BAR.items() if k != "h"}, "data[3].h: missing"),
        (BAR | {"t": None}, "data[3].t: expected a string or a number, got null"),
        (BAR | {"t": "09:30\nAAPL 99"}, "data[3].t: must be one line"),
        (BAR | {"symbol": {"a": 1}}, "data[3].symbol: expected a string or a number, got dict"),
        (BAR | {"symbol": "AA\rPL"}, "data[3].symbol: must be one line"),
        (BAR | {"open": 190.0}, "data[3].o: given as o and open; give one of them"),
        (BAR | {"ticker": "MSFT"}, "data[3].symbol: given as symbol and ticker"),
        ([1, 2, 3], "data[3]: an ohlcv list has 6 values"),
        (42, "data[3]: format 'ohlcv' takes objects or 6-value lists"),
    ],
)
def test_ohlcv_refusals_name_the_entry_and_field(entry, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        render_entry(entry, "ohlcv", 3)
    assert words in str(caught.value)


def test_ohlcv_numbers_keep_every_digit() -> None:
    """A price or a volume is rendered as it was sent, never rounded."""
    bar = [1717, 43251.123456789, 0.00001, 1e16, 2.5, 12345678901.5]
    assert render_entry(bar, "ohlcv", 0) == (
        "1717 o=43251.123456789 h=0.00001 l=10000000000000000 c=2.5 v=12345678901.5\n"
    )


def test_json_is_compact_with_sorted_keys() -> None:
    assert render_entry({"b": 1, "a": [1, "x\ny"]}, "json", 0) == '{"a":[1,"x\\ny"],"b":1}\n'


def test_kv_keeps_its_order_and_one_line() -> None:
    entry = {"sym": "ES", "px": 5012.25, "note": "halted\nresumed", "tags": ["a"]}
    assert render_entry(entry, "kv", 0) == 'sym=ES px=5012.25 note="halted\\nresumed" tags=["a"]\n'
    with pytest.raises(InvalidRequest, match="format 'kv' takes objects"):
        render_entry([1, 2], "kv", 0)


def test_text_format_refuses_objects_and_unknown_formats_are_named() -> None:
    with pytest.raises(InvalidRequest, match="format 'text' takes strings, got dict"):
        render_entry({"a": 1}, "text", 0)
    with pytest.raises(InvalidRequest, match="unknown format 'yaml'"):
        render_entry({"a": 1}, "yaml", 0)
