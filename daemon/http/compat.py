"""What the OpenAI- and Anthropic-compatible routes share: the served model's name, sampling
settings into a ``GenerateRequest``, starting the engine's completion, why an answer stopped,
ids, and SSE writing.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from livelm.daemon.http.errors import HttpError
from livelm.daemon.model.tool_calls import ToolFormat, tool_format
from livelm.protocol.errors import ErrorCode, InvalidRequest, UnknownSession
from livelm.protocol.messages import DoneReply, GenerateRequest

if TYPE_CHECKING:
    from livelm.daemon.engine.conversations import Completion
    from livelm.daemon.engine.engine import Engine
    from livelm.daemon.engine.query import QueryHandle
    from livelm.daemon.engine.sessions import Session
    from livelm.daemon.model.tokenizer import Tokenizer

# OpenAI's and Anthropic's default sampling temperature
DEFAULT_TEMPERATURE = 1.0
OFF_LOOP_BYTES = 16_384  # request bodies from this size are rendered and tokenized on a thread
T = TypeVar("T")


@dataclass(frozen=True)
class Served:
    """The running engine and the name clients address it by (``model`` in a request)."""

    engine_for: Callable[[], Engine]
    model_name: Callable[[], str]

    def engine(self, requested_model: str) -> Engine:
        engine = self.engine_for()
        name = self.model_name()
        if requested_model != name:
            raise HttpError(
                404,
                ErrorCode.INVALID_REQUEST,
                f"the model {requested_model!r} does not exist; this server serves {name!r}",
                openai_code="model_not_found",
            )
        return engine


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def generate_request(engine: Engine, prompt_tokens: int, sampling: Sampling) -> GenerateRequest:
    """The engine's request. ``max_tokens`` is a ceiling, as OpenAI's and Anthropic's clients
    use it: agent clients send large values (Claude Code asks for 32000), so a value above what
    the daemon allows (its ``max_new_tokens`` and the room left in the model's context) is
    clamped to that rather than refused; without one, the answer may take all of it."""
    if sampling.max_tokens is not None and sampling.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {sampling.max_tokens}")
    room = min(engine.config.max_new_tokens, engine.max_context - prompt_tokens)
    if room < 1:
        # the words and code that agent clients look for before they compact a conversation
        raise HttpError(
            400,
            ErrorCode.INVALID_REQUEST,
            f"prompt is too long: {prompt_tokens} tokens > {engine.max_context - 1} maximum "
            f"(the model's context is {engine.max_context} tokens, one of them for the answer)",
            openai_code="context_length_exceeded",
        )
    max_tokens = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
    temperature = sampling.temperature
    return GenerateRequest(
        prompt="",
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if sampling.top_p is None else sampling.top_p,
        top_k=sampling.top_k or 0,
        seed=sampling.seed,
        stop=sampling.stop or None,
    )


async def start_completion(
    engine: Engine,
    tokens: list[int],
    sampling: Sampling,
    session_id: str | None,
) -> Completion:
    if not tokens:
        raise InvalidRequest("the prompt is empty")
    context = _session(engine, session_id).context_tokens if session_id is not None else 0
    req = generate_request(engine, context + len(tokens), sampling)
    return await engine.complete(tokens, req, session_id=session_id)


async def off_loop(engine: Engine, body_size: int, fn: Callable[[], T]) -> T:
    """``fn()`` (rendering, tokenizing) on a worker thread when the request is large, so a
    long conversation does not hold up the event loop."""
    if body_size < OFF_LOOP_BYTES:
        return fn()
    return await engine.loop.run_in_executor(None, fn)


def matched_stop(tokenizer: Tokenizer, done: DoneReply, stops: list[str]) -> str | None:
    """The stop string that ended ``done``, or None (end of sequence, or length).

    The reply's text ends right before the first stop string found in the decoded tokens, so
    the stop string is the one that starts there."""
    if done.finish_reason != "stop" or not stops:
        return None
    full = tokenizer.decode(done.tokens)
    at = len(done.text)
    return next((s for s in stops if full.startswith(s, at)), None)


def answer_tool_format(engine: Engine, has_tools: bool) -> ToolFormat | None:
    """The format to parse tool calls in; None (plain text) when the request offers no tools."""
    return tool_format(engine.tokenizer.chat_template) if has_tools else None


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def json_dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def session_question(engine: Engine, session_id: str, question: str) -> list[int]:
    """A chat request over a session: the question's tokens and the session's question
    suffix (the close of its user turn and the assistant header), as ``generate`` asks it."""
    suffix = _session(engine, session_id).question_suffix
    return engine.tokenizer.encode(question) + list(suffix)


def _session(engine: Engine, session_id: str) -> Session:
    session = engine.sessions.get(session_id)
    if session is None:
        raise UnknownSession(f"unknown session {session_id!r}")
    return session


async def handle_result(handle: QueryHandle) -> DoneReply:
    """The final reply; a client that goes away meanwhile cancels the query."""
    try:
        return await handle.result()
    except BaseException:
        handle.cancel()
        raise
