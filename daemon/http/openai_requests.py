"""OpenAI request bodies (chat completions, completions) and their conversion into the
conversation ``daemon/model/chat.py`` renders. Unknown fields are ignored; fields we cannot
honour (``n`` > 1, ``logprobs``, forced tool choice, ``response_format`` other than text,
penalties, ``logit_bias``, images, ``echo``…) are refused clearly.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from livelm.daemon.http.compat import Sampling, stop_list
from livelm.daemon.model import chat
from livelm.protocol.errors import InvalidRequest

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


Content = str | list[TextPart]


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"


class ToolCallIn(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: str = "function"


class SystemMessage(msgspec.Struct, kw_only=True, tag_field="role", tag="system"):
    content: Content


class DeveloperMessage(msgspec.Struct, kw_only=True, tag_field="role", tag="developer"):
    content: Content


class UserMessage(msgspec.Struct, kw_only=True, tag_field="role", tag="user"):
    content: Content


class AssistantMessage(msgspec.Struct, kw_only=True, tag_field="role", tag="assistant"):
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None


class ToolMessage(msgspec.Struct, kw_only=True, tag_field="role", tag="tool"):
    content: Content
    tool_call_id: str


AnyMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = {}


class ToolDef(msgspec.Struct, kw_only=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Sampled(msgspec.Struct, kw_only=True):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but common in compatible servers
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    session_id: str | None = None  # LiveLM's: answer over this session's context

    def check_common(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("n must be 1: this server returns one choice per request")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampled, kw_only=True):
    messages: list[AnyMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: the first call only
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def sampling(self) -> Sampling:
        self.check_common()
        if self.logprobs or self.top_logprobs:
            raise InvalidRequest("logprobs are not supported by this server")
        if self.tool_choice not in (None, "auto", "none"):
            raise InvalidRequest('tool_choice must be "auto" or "none" on this server')
        self._check_unsupported()
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else None
        return Sampling(
            max_tokens=limit if limit is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop_list(self.stop),
        )

    @property
    def parses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def _check_unsupported(self) -> None:
        """Settings that would change the answer and that this server cannot apply: refused
        rather than ignored, so that a client never takes an unconstrained answer for one."""
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise InvalidRequest(
                f"response_format {kind!r} is not supported by this server (no constrained "
                'decoding); use {"type": "text"} or leave it out'
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise InvalidRequest(f"{name} is not supported by this server; leave it at 0")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server")


class CompletionRequest(_Sampled, kw_only=True):
    prompt: str | list[Any]  # a text, a list of one text, or token ids
    max_tokens: int | None = COMPLETION_MAX_TOKENS  # an explicit null means it too
    echo: bool | None = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def sampling(self) -> Sampling:
        self.check_common()
        if self.echo:
            raise InvalidRequest("echo is not supported by this server")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of must be 1 on this server")
        if self.logprobs is not None:
            raise InvalidRequest("logprobs are not supported by this server")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by this server")
        return Sampling(
            max_tokens=COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop_list(self.stop),
        )


def conversation(messages: list[AnyMessage]) -> list[chat.Message]:
    """OpenAI's messages as the chat template's conversation."""
    if not messages:
        raise InvalidRequest("messages is empty: send at least one message")
    names: dict[str, str] = {}  # tool call id -> function name, for tool results
    converted = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(message, SystemMessage | DeveloperMessage):
            converted.append(chat.system_message(_text(message.content, where)))
        elif isinstance(message, UserMessage):
            converted.append(chat.user_message(_text(message.content, where)))
        elif isinstance(message, AssistantMessage):
            converted.append(_assistant(message, where, names))
        else:
            text = _text(message.content, where)
            converted.append(
                chat.tool_message(text, message.tool_call_id, names.get(message.tool_call_id))
            )
    return converted


def tools_for_template(tools: list[ToolDef] | None) -> list[chat.Message] | None:
    if not tools:
        return None
    return [
        chat.function_tool(t.function.name, t.function.description, t.function.parameters)
        for t in tools
    ]


def _assistant(message: AssistantMessage, where: str, names: dict[str, str]) -> chat.Message:
    content = "" if message.content is None else _text(message.content, where)
    calls = []
    for call in message.tool_calls or []:
        names[call.id] = call.function.name
        calls.append(chat.tool_call(call.id, call.function.name, call.function.arguments))
    return chat.assistant_message(content, calls)


def _text(content: Content, where: str) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"{where}.content[{j}] is of type {part.type!r}; only text parts are supported"
            )
        pieces.append(part.text)
    return "".join(pieces)
