"""Tool calls parsed from answer text (Hermes and Llama 3 formats), whole and streamed."""

from __future__ import annotations

import pytest

from livelm.daemon.model.tool_calls import (
    ParsedAnswer,
    ToolCall,
    ToolFormat,
    parse_answer,
    tool_format,
)
from livelm.daemon.model.tool_stream import ToolStream
from tests.scripted_model import HERMES_TEMPLATE
from tests.tiny_models import CHATML_TEMPLATE, LLAMA3_TEMPLATE

WEATHER = ToolCall("get_weather", {"city": "Paris"})
TIME = ToolCall("get_time", {"zone": "CET", "precise": True})


def test_format_is_read_from_the_template() -> None:
    assert tool_format(HERMES_TEMPLATE) is ToolFormat.HERMES
    assert tool_format(LLAMA3_TEMPLATE) is ToolFormat.LLAMA3
    assert tool_format("{{ '<|python_tag|>' }}") is ToolFormat.LLAMA3
    assert tool_format(CHATML_TEMPLATE) is None  # shows no tool-call format
    assert tool_format(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
            ParsedAnswer("", (WEATHER,)),
        ),
        (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
            '{"zone": "CET", "precise": true}}\n</tool_call>',
            ParsedAnswer("Let me check.\n", (WEATHER, TIME)),  # as a stream shows it
        ),
        # arguments written as a JSON string; an unclosed last block at the end of the answer
        (
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
            ParsedAnswer("", (WEATHER,)),
        ),
    ],
)
def test_hermes_calls(text: str, expected: ParsedAnswer) -> None:
    assert parse_answer(text, ToolFormat.HERMES) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        # one bad block keeps the whole answer as text: nothing is half-parsed
        '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": </tool_call>',
    ],
)
def test_hermes_unparseable_stays_text(text: str) -> None:
    assert parse_answer(text, ToolFormat.HERMES) == ParsedAnswer(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', (WEATHER,)),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', (WEATHER,)),
        (
            ' {"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "arguments": {"zone": "CET", "precise": true}}\n',
            (WEATHER, TIME),
        ),
    ],
)
def test_llama3_calls(text: str, expected: tuple[ToolCall, ...]) -> None:
    assert parse_answer(text, ToolFormat.LLAMA3) == ParsedAnswer("", expected)


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Paris.",
        '{"name": "get_weather", "parameters": {"city": "Paris"}} and some more text',
        '{"city": "Paris"}',  # JSON but not a call
        '{"name": "get_weather", "parameters": {"city": ',  # cut off
        'Here: {"name": "get_weather", "parameters": {}}',  # a call must be the whole answer
    ],
)
def test_llama3_unparseable_stays_text(text: str) -> None:
    assert parse_answer(text, ToolFormat.LLAMA3) == ParsedAnswer(text)


def test_no_format_means_plain_text() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse_answer(text, None) == ParsedAnswer(text)


def _stream(fmt: ToolFormat | None, pieces: list[str]) -> tuple[str, ParsedAnswer]:
    stream = ToolStream(fmt)
    shown = "".join(stream.feed(piece) for piece in pieces)
    return shown, stream.finish()


def test_hermes_stream_shows_text_before_the_tag_and_holds_the_call() -> None:
    pieces = ["Let me ", "check.\n<to", "ol_call>", '{"name": "get_weather", ', '"arguments": ']
    pieces += ['{"city": "Paris"}}', "</tool_call>"]
    shown, rest = _stream(ToolFormat.HERMES, pieces)
    assert shown == "Let me check.\n"
    assert rest == ParsedAnswer("", (WEATHER,))


def test_hermes_stream_releases_a_partial_tag_that_was_not_one() -> None:
    shown, rest = _stream(ToolFormat.HERMES, ["a <to", "day b"])
    assert shown + rest.content == "a <today b"
    assert rest.tool_calls == ()


def test_llama3_stream_holds_json_and_streams_prose() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    shown, rest = _stream(ToolFormat.LLAMA3, ["  ", call[:10], call[10:]])
    assert (shown, rest) == ("", ParsedAnswer("", (WEATHER,)))
    shown, rest = _stream(ToolFormat.LLAMA3, ["  It is", " sunny."])
    assert (shown, rest) == ("  It is sunny.", ParsedAnswer(""))


def test_stream_of_bad_call_returns_the_held_text() -> None:
    shown, rest = _stream(ToolFormat.HERMES, ["ok <tool_call>{broken", "</tool_call>"])
    assert shown + rest.content == "ok <tool_call>{broken</tool_call>"
    assert rest.tool_calls == ()


def test_stream_without_format_passes_everything() -> None:
    shown, rest = _stream(None, ["<tool_call>", "{}"])
    assert (shown, rest) == ("<tool_call>{}", ParsedAnswer(""))


@pytest.mark.parametrize(
    "text",
    [
        'Let me check.\n\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call>",
        'I will call <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call> and then answer.",
        "Plain prose, no call at all.\n",
        'ok <tool_call>{broken</tool_call>',
    ],
)
def test_a_streamed_answer_reads_as_the_whole_one(text: str) -> None:
    whole = parse_answer(text, ToolFormat.HERMES)
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    shown, rest = _stream(ToolFormat.HERMES, pieces)
    assert (shown + rest.content, rest.tool_calls) == (whole.content, whole.tool_calls)
