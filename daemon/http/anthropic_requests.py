"""Anthropic's ``POST /v1/messages`` request body and its conversion into the conversation
``daemon/model/chat.py`` renders. Unknown fields (``metadata``, ``cache_control``…) are
ignored; block types other than text, tool_use and tool_result are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from livelm.daemon.http.compat import Sampling
from livelm.daemon.model import chat
from livelm.protocol.errors import InvalidRequest


class TextBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="text"):
    text: str


class ToolUseBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="tool_result"):
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False


Block = TextBlock | ToolUseBlock | ToolResultBlock


class MessageIn(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = {}


class ToolChoice(msgspec.Struct, kw_only=True):
    type: str


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """The conversation part of a request: all ``/v1/messages/count_tokens`` reads."""

    model: str
    messages: list[MessageIn]
    system: str | list[TextBlock] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None

    @property
    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return "".join(block.text for block in self.system)


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    session_id: str | None = None  # LiveLM's: answer over this session's context

    def sampling(self) -> Sampling:
        if self.tool_choice is not None and self.tool_choice.type not in ("auto", "none"):
            raise InvalidRequest('tool_choice must be of type "auto" or "none" on this server')
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=None,
            stop=list(self.stop_sequences or []),
        )

    @property
    def parses_tools(self) -> bool:
        offered = bool(self.tools)
        return offered and (self.tool_choice is None or self.tool_choice.type != "none")


def conversation(req: CountTokensRequest) -> list[chat.Message]:
    """The system prompt and messages as the chat template's conversation."""
    if not req.messages:
        raise InvalidRequest("messages is empty: send at least one message")
    if req.messages[-1].role != "user":
        raise InvalidRequest(
            "the last message must be the user's (assistant prefill is not supported)"
        )
    converted = [chat.system_message(req.system_text)] if req.system_text else []
    names: dict[str, str] = {}  # tool_use id -> tool name, for tool results
    for i, message in enumerate(req.messages):
        where = f"messages[{i}]"
        if isinstance(message.content, str):
            blocks: list[Block] = [TextBlock(text=message.content)]
        else:
            blocks = message.content
        if message.role == "user":
            converted += _user(blocks, where, names)
        else:
            converted.append(_assistant(blocks, where, names))
    return converted


def tools_for_template(tools: list[ToolIn] | None) -> list[chat.Message] | None:
    if not tools:
        return None
    return [chat.function_tool(t.name, t.description, t.input_schema) for t in tools]


def question_text(req: MessagesRequest) -> str:
    """The one user message's text: the question asked over a session."""
    if req.system_text or req.tools or len(req.messages) != 1:
        raise InvalidRequest(
            "with session_id, send exactly one user message (no system, no tools): the "
            "question asked over the session's context"
        )
    (message,) = conversation(req)
    return message["content"]


def _user(blocks: list[Block], where: str, names: dict[str, str]) -> list[chat.Message]:
    """Tool results first (they answer the assistant's last turn), then the user's text."""
    results, texts = [], []
    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            content = _result_text(block)
            results.append(
                chat.tool_message(content, block.tool_use_id, names.get(block.tool_use_id))
            )
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        else:
            raise InvalidRequest(f"{where}.content[{j}]: a user message cannot hold tool_use")
    return results + ([chat.user_message("".join(texts))] if texts else [])


def _assistant(blocks: list[Block], where: str, names: dict[str, str]) -> chat.Message:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        if isinstance(block, ToolUseBlock):
            names[block.id] = block.name
            calls.append(chat.tool_call(block.id, block.name, block.input))
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        else:
            raise InvalidRequest(
                f"{where}.content[{j}]: an assistant message cannot hold tool_result"
            )
    return chat.assistant_message("".join(texts), calls)


def _result_text(block: ToolResultBlock) -> str:
    text = (
        block.content if isinstance(block.content, str) else "".join(b.text for b in block.content)
    )
    return f"Error: {text}" if block.is_error else text
