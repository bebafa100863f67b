"""Streams an answer's plain text at once while holding back what may be a tool call.

``feed`` returns the text that can be shown now; ``finish`` parses what was held back into
the rest of the content and the tool calls. Hermes: text before ``<tool_call>`` streams (a
possible partial ``<tool_call>`` at the end is held); from the tag on, everything is held.
Llama 3: an answer whose first visible character is ``{`` (or that opens with the python
tag) is held whole; any other answer streams.
"""

from __future__ import annotations

from livelm.daemon.model.tool_calls import (
    HERMES_OPEN,
    PYTHON_TAG,
    ParsedAnswer,
    ToolFormat,
    parse_answer,
)


class ToolStream:
    def __init__(self, fmt: ToolFormat | None) -> None:
        self._fmt = fmt
        self._held = ""
        self._capturing = False  # all further text is held: it may be a tool call
        self._passing = fmt is None  # all further text streams: it cannot be a tool call

    def feed(self, text: str) -> str:
        if self._passing:
            return text
        self._held += text
        if self._capturing:
            return ""
        if self._fmt is ToolFormat.HERMES:
            return self._feed_hermes()
        return self._feed_llama3()

    def finish(self) -> ParsedAnswer:
        held, self._held = self._held, ""
        if self._capturing:
            return parse_answer(held, self._fmt)
        return ParsedAnswer(held)

    def _feed_hermes(self) -> str:
        start = self._held.find(HERMES_OPEN)
        if start >= 0:
            self._capturing = True
            return self._release(start)
        return self._release(len(self._held) - _partial_suffix(self._held, HERMES_OPEN))

    def _feed_llama3(self) -> str:
        visible = self._held.lstrip()
        if not visible:
            return ""
        if visible.startswith("{") or visible.startswith(PYTHON_TAG):
            self._capturing = True
            return ""
        if PYTHON_TAG.startswith(visible):
            return ""  # may still become the tag
        self._passing = True
        return self._release(len(self._held))

    def _release(self, end: int) -> str:
        out, self._held = self._held[:end], self._held[end:]
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
