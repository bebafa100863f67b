"""Request and reply bodies shared by every transport (HTTP now; TCP/WebSocket frames reuse them).

Field names follow PROTOCOL.md. Unknown keys are ignored; wrong types are rejected by msgspec
with a message naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Template = Literal["chat", "raw"]
EntryFormat = Literal["text", "json", "ohlcv", "kv"]
# how pushed data spelling a special token ("<|eot_id|>") is tokenized: as that control token
# (transformers' default), or as the plain text it is
SpecialTokens = Literal["control", "text"]


class FlashSpec(msgspec.Struct, kw_only=True):
    query: str
    max_tokens: int = 16


class InitRequest(msgspec.Struct, kw_only=True):
    prompt: str = ""
    session_id: str | None = None
    template: Template = "chat"
    format: EntryFormat = "text"
    window: int | None = None
    flash: list[FlashSpec] = []
    special_tokens: SpecialTokens = "control"


class PushRequest(msgspec.Struct, kw_only=True):
    data: list[Any]


class GenerateRequest(msgspec.Struct, kw_only=True):
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    choices: list[str] | None = None
    stream: bool = False


class SessionReply(msgspec.Struct, kw_only=True):
    session_id: str
    prompt_tokens: int
    template: Template
    format: EntryFormat
    window: int
    special_tokens: SpecialTokens = "control"


class PushReply(msgspec.Struct, kw_only=True):
    session_id: str
    seq: int
    accepted: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int  # the question's tokens
    completion_tokens: int
    context_tokens: int  # the session context the answer saw


class DoneReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    text: str
    tokens: list[int]
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    data_seq: int
    cached: bool  # always sent: answered from a flash query's cache, without GPU work
    choice: str | None = None
    probs: dict[str, float] | None = None


class TokenEvent(msgspec.Struct, kw_only=True):
    """One generated token and the text it makes visible (empty while text is held back, e.g.
    a UTF-8 sequence cut mid-way). ``token`` is null only on a final flush of held-back text.
    The texts of all events of an answer add up to its final text."""

    text: str
    token: int | None


class StatusReply(msgspec.Struct, kw_only=True):
    session_id: str
    data_seq: int  # last entry accepted
    ingested_seq: int  # last entry whose tokens are all in the KV cache
    context_tokens: int  # tokens in the KV cache now
    pending_tokens: int  # accepted tokens not yet in the KV cache
    window: int
    prompt_tokens: int
    entries: int  # entries retained in the context
    first_seq: int  # seq of the oldest retained entry (0 when none)
    dropped_entries: int  # entries dropped past the window so far
    template: Template
    format: EntryFormat
    # why the session stopped advancing (computing its data failed); its queries then fail
    error: str | None = None


class FlashRegistered(msgspec.Struct, kw_only=True):
    query_id: int  # per session, from 1
    query: str
    max_tokens: int


class FlashAnswer(msgspec.Struct, kw_only=True):
    session_id: str
    query_id: int
    query: str
    text: str
    confidence: float  # p(top1) - p(top2) of the first answer token's distribution
    data_seq: int  # the last entry the answer saw


class DataUpdated(msgspec.Struct, kw_only=True):
    session_id: str
    data_seq: int  # newest entry now fully in the KV cache (ingested_seq)
    tokens: int  # context tokens now in the KV cache


class EventsLost(msgspec.Struct, kw_only=True):
    """A subscriber fell behind the event buffer: events ``requested`` up to
    ``first_available - 1`` are gone; the stream continues at ``first_available``."""

    session_id: str
    requested: int
    first_available: int


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    code: str


class ErrorReply(msgspec.Struct, kw_only=True):
    error: ErrorBody
