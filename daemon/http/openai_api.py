"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models``, in OpenAI's shapes (SSE chunks then ``data: [DONE]`` when streaming).

A chat request is rendered through the model's chat template; tool calls in the answer are
parsed in the template's format when the request offers tools. ``session_id`` (an extra body
field) asks the request over a LiveLM session's context instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from livelm.daemon.http import compat
from livelm.daemon.http.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    UserMessage,
    conversation,
    tools_for_template,
)
from livelm.daemon.http.sessions import decode_json, json_response
from livelm.daemon.http.sse import data_line, stream_answer
from livelm.daemon.model import chat
from livelm.daemon.model.tool_calls import ParsedAnswer, ToolCall, parse_answer
from livelm.daemon.model.tool_stream import ToolStream
from livelm.protocol.errors import InvalidRequest

if TYPE_CHECKING:
    from livelm.daemon.engine.conversations import Completion
    from livelm.daemon.engine.engine import Engine
    from livelm.daemon.model.tool_calls import ToolFormat
    from livelm.protocol.messages import DoneReply, TokenEvent

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
DONE_LINE = b"data: [DONE]\n\n"


class OpenAIRoutes:
    def __init__(self, served: compat.Served) -> None:
        self.served = served

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
        ]

    async def models(self, request: web.Request) -> web.Response:
        self.served.engine_for()  # 503 while the model loads, as every other route
        name = self.served.model_name()
        # OpenAI's list, with the paging fields Anthropic's SDK reads
        body = {"object": "list", "data": [_model_object(name)], "has_more": False}
        return json_response(body | {"first_id": name, "last_id": name})

    async def model(self, request: web.Request) -> web.Response:
        self.served.engine(request.match_info["model"])  # 404 for any other name
        return json_response(_model_object(self.served.model_name()))


    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = decode_json(body, ChatCompletionRequest)
        engine = self.served.engine(req.model)
        sampling = req.sampling()
        tokens = await compat.off_loop(engine, len(body), lambda: _chat_tokens(engine, req))
        fmt = compat.answer_tool_format(engine, req.parses_tools)
        completion = await compat.start_completion(engine, tokens, sampling, req.session_id)
        reply = _Reply("chatcmpl-", req.model, completion)
        single = req.parallel_tool_calls is False
        if req.stream:
            shape = _ChatChunks(reply, fmt, req.include_usage, single_call=single)
            return await stream_answer(request, completion.handle, shape)
        done = await compat.handle_result(completion.handle)
        parsed = _calls_allowed(parse_answer(done.text, fmt), single)
        return json_response(reply.chat_body(done, parsed))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = decode_json(body, CompletionRequest)
        engine = self.served.engine(req.model)
        sampling = req.sampling()
        over_session = req.session_id is not None
        tokens = await compat.off_loop(
            engine, len(body), lambda: _completion_tokens(engine, req.prompt, over_session)
        )
        completion = await compat.start_completion(engine, tokens, sampling, req.session_id)
        reply = _Reply("cmpl-", req.model, completion)
        if req.stream:
            shape = _TextChunks(reply, req.include_usage)
            return await stream_answer(request, completion.handle, shape)
        done = await compat.handle_result(completion.handle)
        return json_response(reply.text_body(done))


def _chat_tokens(engine: Engine, req: ChatCompletionRequest) -> list[int]:
    if req.session_id is None:
        messages = conversation(req.messages)
        return chat.prompt_tokens(engine.tokenizer, messages, tools_for_template(req.tools))
    if req.tools:
        raise InvalidRequest("tools cannot be used with session_id")
    if len(req.messages) != 1 or not isinstance(req.messages[0], UserMessage):
        raise InvalidRequest(
            "with session_id, messages holds exactly one user message: the question asked "
            "over the session's context"
        )
    question = conversation(req.messages)[0]["content"]
    return compat.session_question(engine, req.session_id, question)


def _completion_tokens(engine: Engine, prompt: str | list[Any], over_session: bool) -> list[int]:
    """A text prompt is tokenized after the model's BOS (none over a session, whose context
    has it); a list of token ids is taken as it is."""
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string, a list of one string, or token ids")
    tokenizer = engine.tokenizer
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and not over_session else []
    return bos + tokenizer.encode(prompt)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Reply:
    """What every body and chunk of one answer shares."""

    def __init__(self, prefix: str, model: str, completion: Completion) -> None:
        self.id = compat.new_id(prefix)
        self.created = compat.now()
        self.model = model
        self.completion = completion

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, done: DoneReply) -> dict[str, Any]:
        prompt = self.completion.prompt_tokens
        completion = done.usage.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.completion.cached_tokens},
        }

    def chat_body(self, done: DoneReply, parsed: ParsedAnswer) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": parsed.content if parsed.content or not parsed.tool_calls else None,
        }
        if parsed.tool_calls:
            message["tool_calls"] = [_tool_call(c) for c in parsed.tool_calls]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": _finish_reason(done, parsed),
        }
        body = self.head("chat.completion")
        return body | {"choices": [choice], "usage": self.usage(done)}

    def text_body(self, done: DoneReply) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": done.text,
            "logprobs": None,
            "finish_reason": _finish_reason(done, ParsedAnswer(done.text)),
        }
        return self.head("text_completion") | {"choices": [choice], "usage": self.usage(done)}


def _finish_reason(done: DoneReply, parsed: ParsedAnswer) -> str:
    if parsed.tool_calls:
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {} if index is None else {"index": index}
    return body | {
        "id": compat.new_id("call_"),
        "type": "function",
        "function": {"name": call.name, "arguments": compat.json_dumps(call.arguments)},
    }


def _calls_allowed(parsed: ParsedAnswer, single: bool) -> ParsedAnswer:
    """``parallel_tool_calls: false``: the answer's first call, the others dropped."""
    if single and len(parsed.tool_calls) > 1:
        return ParsedAnswer(parsed.content, parsed.tool_calls[:1])
    return parsed


# ---- streaming --------------------------------------------------------------------------------
class _ChatChunks:
    """The chunks of a streamed chat completion."""

    def __init__(
        self, reply: _Reply, fmt: ToolFormat | None, include_usage: bool, *, single_call: bool
    ) -> None:
        self.reply, self.include_usage = reply, include_usage
        self.tools = ToolStream(fmt)
        self.single_call = single_call

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = self.reply.head("chat.completion.chunk") | {"choices": [choice]}
        return data_line(body | {"usage": None} if self.include_usage else body)

    def start(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def token(self, event: TokenEvent) -> list[bytes]:
        shown = self.tools.feed(event.text)
        return [self._chunk({"content": shown})] if shown else []

    def end(self, done: DoneReply) -> list[bytes]:
        parsed = _calls_allowed(self.tools.finish(), self.single_call)
        chunks = [self._chunk({"content": parsed.content})] if parsed.content else []
        chunks += [
            self._chunk({"tool_calls": [_tool_call(call, i)]})
            for i, call in enumerate(parsed.tool_calls)
        ]
        chunks.append(self._chunk({}, _finish_reason(done, parsed)))
        if self.include_usage:
            head = self.reply.head("chat.completion.chunk")
            chunks.append(data_line(head | {"choices": [], "usage": self.reply.usage(done)}))
        return [*chunks, DONE_LINE]

    def error(self, body: bytes) -> bytes:
        return b"data: " + body + b"\n\n"


class _TextChunks:
    """The chunks of a streamed (text) completion."""

    def __init__(self, reply: _Reply, include_usage: bool) -> None:
        self.reply, self.include_usage = reply, include_usage

    def _chunk(self, text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = self.reply.head("text_completion") | {"choices": [choice]}
        return data_line(body | {"usage": None} if self.include_usage else body)

    def start(self) -> list[bytes]:
        return []

    def token(self, event: TokenEvent) -> list[bytes]:
        return [self._chunk(event.text)] if event.text else []

    def end(self, done: DoneReply) -> list[bytes]:
        chunks = [self._chunk("", _finish_reason(done, ParsedAnswer(done.text)))]
        if self.include_usage:
            head = self.reply.head("text_completion")
            chunks.append(data_line(head | {"choices": [], "usage": self.reply.usage(done)}))
        return [*chunks, DONE_LINE]

    def error(self, body: bytes) -> bytes:
        return b"data: " + body + b"\n\n"


def _model_object(name: str) -> dict[str, Any]:
    """The served model in OpenAI's shape and Anthropic's at once (their fields differ)."""
    openai_fields = {"id": name, "object": "model", "created": 0, "owned_by": "livelm"}
    anthropic_fields = {"type": "model", "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
    return openai_fields | anthropic_fields
