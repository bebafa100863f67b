"""Tool calls in a model's answer text, in the format its chat template teaches.

- ``hermes`` (Qwen, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, possibly several, possibly with text around them.
- ``llama3`` (Llama 3.1+): the whole answer is ``[<|python_tag|>]{"name": ..., "parameters":
  {...}}``, several calls separated by ``;``.

The format is read from the chat template's text. An answer that does not parse as calls of
its format stays plain text: nothing is dropped or guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any


class ToolFormat(str, Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"


HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_LLAMA3_MARKERS = (PYTHON_TAG, "ipython")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedAnswer:
    content: str  # the text that is not a tool call
    tool_calls: tuple[ToolCall, ...] = ()


def tool_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None when it shows none we know."""
    if chat_template is None:
        return None
    if HERMES_OPEN in chat_template:
        return ToolFormat.HERMES
    if any(marker in chat_template for marker in _LLAMA3_MARKERS):
        return ToolFormat.LLAMA3
    return None


def parse_answer(text: str, fmt: ToolFormat | None) -> ParsedAnswer:
    """Split ``text`` into content and tool calls; plain text when it holds no valid call."""
    if fmt is ToolFormat.HERMES:
        return _parse_hermes(text)
    if fmt is ToolFormat.LLAMA3:
        return _parse_llama3(text)
    return ParsedAnswer(text)


def _parse_hermes(text: str) -> ParsedAnswer:
    blocks = list(_HERMES_BLOCK.finditer(text))
    if not blocks:
        return ParsedAnswer(text)
    calls = [_call(_json_object(b.group(1)), "arguments") for b in blocks]
    if any(c is None for c in calls):
        return ParsedAnswer(text)
    # the text before the first call as it is (a stream has sent it already), the rest with
    # the calls taken out and trimmed: streamed and whole answers then read the same
    first = blocks[0].start()
    content = text[:first] + _HERMES_BLOCK.sub("", text[first:]).strip()
    return ParsedAnswer(content, tuple(c for c in calls if c is not None))


def _parse_llama3(text: str) -> ParsedAnswer:
    body = text.strip()
    body = body.removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return ParsedAnswer(text)
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    position = 0
    while position < len(body):
        try:
            value, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return ParsedAnswer(text)
        call = _call(value, "parameters")
        if call is None:
            return ParsedAnswer(text)
        calls.append(call)
        position = _skip_separator(body, end)
        if position is None:
            return ParsedAnswer(text)
    return ParsedAnswer("", tuple(calls))


def _skip_separator(body: str, end: int) -> int | None:
    """Where the next call starts after one ending at ``end`` (``;`` between calls), the
    body's end when it ends there, or None when other text follows."""
    rest = body[end:].lstrip()
    if not rest:
        return len(body)
    if not rest.startswith(";"):
        return None
    after = rest[1:].lstrip()
    return len(body) - len(after) if after else len(body)


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call(value: Any, arguments_key: str) -> ToolCall | None:
    """A call from ``{"name": str, KEY: object}`` (either of both argument keys is taken)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get(_OTHER_KEY[arguments_key], {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], arguments)


_OTHER_KEY = {"arguments": "parameters", "parameters": "arguments"}
