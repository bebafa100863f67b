"""Anthropic-compatible route: ``POST /v1/messages`` in Anthropic's shape, and its event
stream (message_start, content blocks, message_delta, message_stop) when ``stream``.

The conversation is rendered through the model's chat template; tool calls in the answer are
parsed in the template's format when the request offers tools and become ``tool_use`` blocks.
``usage.input_tokens`` counts the prompt tokens computed for this request;
``cache_read_input_tokens`` those whose KV was reused (their sum is the whole prompt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from livelm.daemon.http import compat
from livelm.daemon.http.anthropic_requests import (
    CountTokensRequest,
    MessagesRequest,
    conversation,
    question_text,
    tools_for_template,
)
from livelm.daemon.http.sessions import decode_json, json_response
from livelm.daemon.http.sse import named_event, stream_answer
from livelm.daemon.model import chat
from livelm.daemon.model.tool_calls import ParsedAnswer, ToolCall, parse_answer
from livelm.daemon.model.tool_stream import ToolStream

if TYPE_CHECKING:
    from livelm.daemon.engine.conversations import Completion
    from livelm.daemon.engine.engine import Engine
    from livelm.daemon.model.tool_calls import ToolFormat
    from livelm.protocol.messages import DoneReply, TokenEvent

MESSAGES_PATH = "/v1/messages"


class AnthropicRoutes:
    def __init__(self, served: compat.Served) -> None:
        self.served = served

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(MESSAGES_PATH, self.messages),
            web.post(MESSAGES_PATH + "/count_tokens", self.count_tokens),
        ]

    async def count_tokens(self, request: web.Request) -> web.Response:
        """The prompt's token count: what ``usage.input_tokens`` is without any reuse."""
        body = await request.read()
        req = decode_json(body, CountTokensRequest)
        engine = self.served.engine(req.model)
        tools = tools_for_template(req.tools)
        tokens = await compat.off_loop(
            engine,
            len(body),
            lambda: chat.prompt_tokens(engine.tokenizer, conversation(req), tools),
        )
        return json_response({"input_tokens": len(tokens)})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = decode_json(body, MessagesRequest)
        engine = self.served.engine(req.model)
        sampling = req.sampling()
        tokens = await compat.off_loop(engine, len(body), lambda: _prompt_tokens(engine, req))
        fmt = compat.answer_tool_format(engine, req.parses_tools)
        completion = await compat.start_completion(engine, tokens, sampling, req.session_id)
        reply = _Reply(req.model, completion, engine, sampling.stop)
        if req.stream:
            return await stream_answer(request, completion.handle, _Events(reply, fmt))
        done = await compat.handle_result(completion.handle)
        return json_response(reply.body(done, parse_answer(done.text, fmt)))


def _prompt_tokens(engine: Engine, req: MessagesRequest) -> list[int]:
    if req.session_id is not None:
        return compat.session_question(engine, req.session_id, question_text(req))
    return chat.prompt_tokens(engine.tokenizer, conversation(req), tools_for_template(req.tools))


class _Reply:
    """What the body and the events of one answer share."""

    def __init__(self, model: str, completion: Completion, engine: Engine, stop: list[str]) -> None:
        self.id = compat.new_id("msg_")
        self.model = model
        self.completion = completion
        self.engine = engine
        self.stop = stop

    def message(self, content: list[dict[str, Any]], done: DoneReply | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.usage(done),
        }

    def usage(self, done: DoneReply | None) -> dict[str, int]:
        cached = self.completion.cached_tokens
        return {
            "input_tokens": self.completion.prompt_tokens - cached,
            "output_tokens": 0 if done is None else done.usage.completion_tokens,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }

    def stop_fields(self, done: DoneReply, parsed: ParsedAnswer) -> dict[str, str | None]:
        if parsed.tool_calls:
            return {"stop_reason": "tool_use", "stop_sequence": None}
        if done.finish_reason == "length":
            return {"stop_reason": "max_tokens", "stop_sequence": None}
        matched = compat.matched_stop(self.engine.tokenizer, done, self.stop)
        reason = "end_turn" if matched is None else "stop_sequence"
        return {"stop_reason": reason, "stop_sequence": matched}

    def body(self, done: DoneReply, parsed: ParsedAnswer) -> dict[str, Any]:
        content = [_text_block(parsed.content)] if parsed.content else []
        content += [_tool_block(call) for call in parsed.tool_calls]
        return self.message(content, done) | self.stop_fields(done, parsed)


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _tool_block(call: ToolCall, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    given = call.arguments if arguments is None else arguments
    return {"type": "tool_use", "id": compat.new_id("toolu_"), "name": call.name, "input": given}


class _Events:
    """The event stream of one answer; a text block opens at the first visible text."""

    def __init__(self, reply: _Reply, fmt: ToolFormat | None) -> None:
        self.reply = reply
        self.tools = ToolStream(fmt)
        self.blocks = 0  # content blocks opened so far
        self.text_open = False

    def start(self) -> list[bytes]:
        start = {"type": "message_start", "message": self.reply.message([], None)}
        return [named_event("message_start", start), named_event("ping", {"type": "ping"})]

    def token(self, event: TokenEvent) -> list[bytes]:
        return self._show(self.tools.feed(event.text))

    def _show(self, shown: str) -> list[bytes]:
        if not shown:
            return []
        events = [] if self.text_open else self._open(_text_block(""))
        self.text_open = True
        delta = {"type": "text_delta", "text": shown}
        return [*events, self._event("content_block_delta", delta=delta)]

    def end(self, done: DoneReply) -> list[bytes]:
        parsed = self.tools.finish()
        events = self._show(parsed.content)
        events += self._close_text()
        for call in parsed.tool_calls:
            events += self._open(_tool_block(call, {}))
            delta = {"type": "input_json_delta", "partial_json": compat.json_dumps(call.arguments)}
            events.append(self._event("content_block_delta", delta=delta))
            events.append(self._event("content_block_stop"))
        usage = {"output_tokens": done.usage.completion_tokens}
        delta = {
            "type": "message_delta",
            "delta": self.reply.stop_fields(done, parsed),
            "usage": usage,
        }
        events.append(named_event("message_delta", delta))
        events.append(named_event("message_stop", {"type": "message_stop"}))
        return events

    def error(self, body: bytes) -> bytes:
        return b"event: error\ndata: " + body + b"\n\n"

    def _open(self, block: dict[str, Any]) -> list[bytes]:
        self.blocks += 1
        return [self._event("content_block_start", content_block=block)]

    def _close_text(self) -> list[bytes]:
        if not self.text_open:
            return []
        self.text_open = False
        return [self._event("content_block_stop")]

    def _event(self, kind: str, **fields: Any) -> bytes:
        """An event of the block opened last."""
        return named_event(kind, {"type": kind, "index": self.blocks - 1, **fields})
