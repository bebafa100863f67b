"""Event-loop side of a session: its layout, accepted entries, window and progress."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import StatusReply

_SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def new_session_id(requested: str | None, taken: Container[str]) -> str:
    if requested is None:
        return "s_" + secrets.token_urlsafe(18)
    # dots alone would be path segments that HTTP clients resolve away ("/sessions/../x")
    if not _SESSION_ID.fullmatch(requested) or not requested.strip("."):
        raise InvalidRequest(
            "session_id must be 1-128 characters of letters, digits, '_', '-', '.' or ':', "
            "not dots alone"
        )
    if requested in taken:
        raise InvalidRequest(f"session {requested!r} already exists")
    return requested


@dataclass(frozen=True)
class PushPlan:
    first_seq: int
    last_seq: int
    first_kept_seq: int | None  # set when the push overflows the window
    sizes: list[int]  # tokens of each new entry
    drop: int  # entries dropped from the oldest, the retained ones first, then the new ones
    data_tokens: int


@dataclass
class Session:
    session_id: str
    slot: int
    template: str
    format: str
    window: int
    opening_tokens: int
    question_suffix: list[int]
    low_water: float
    entries: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, tokens), retained
    data_tokens: int = 0
    last_seq: int = 0
    dropped: int = 0
    ingested_seq: int = 0
    computed_tokens: int = 0
    pending_tokens: int = 0
    reserved_blocks: int = 0
    error: str | None = None  # set once the worker failed to compute the session's data
    # (last seq, monotonic time) of each acknowledged push not yet ingested, for the ingest
    # latency histogram
    acks: deque[tuple[int, float]] = field(default_factory=deque)
    forked: int = 0  # queries in flight that were forked from this session
    pinned: int = 0  # blocks those queries still read after a trim or the close let them go
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    literal_specials: bool = False  # pushed text spelling a special token stays text

    @property
    def context_tokens(self) -> int:
        """Tokens of the context once every accepted entry is ingested."""
        return self.opening_tokens + self.data_tokens

    def plan_push(self, sizes: list[int]) -> PushPlan:
        """Assigns seqs; past the window, drops the oldest entries down to the low-water mark.
        Nothing is copied: the plan says how many entries go, so a push costs the same at
        any context length."""
        first = self.last_seq + 1
        data = self.data_tokens + sum(sizes)
        first_kept, drop = None, 0
        if self.opening_tokens + data > self.window:
            floor = int(self.window * self.low_water)
            old, total = len(self.entries), len(self.entries) + len(sizes)
            for size in itertools.chain((n for _, n in self.entries), sizes):
                if total - drop <= 1 or self.opening_tokens + data <= floor:
                    break
                data -= size
                drop += 1
            first_kept = self.entries[drop][0] if drop < old else first + drop - old
        return PushPlan(first, first + len(sizes) - 1, first_kept, sizes, drop, data)

    def commit(self, plan: PushPlan) -> None:
        old = len(self.entries)
        for _ in range(min(plan.drop, old)):
            self.entries.popleft()
        new_dropped = max(0, plan.drop - old)
        self.entries.extend(
            (plan.first_seq + i, n) for i, n in enumerate(plan.sizes) if i >= new_dropped
        )
        self.dropped += plan.drop
        self.data_tokens = plan.data_tokens
        self.last_seq = plan.last_seq

    def _tokens_after(self, seq: int) -> int:
        """Tokens of the retained entries past ``seq``: accepted data the worker's own count
        misses while it is still in the ring."""
        total = 0
        for entry_seq, tokens in reversed(self.entries):
            if entry_seq <= seq:
                break
            total += tokens
        return total

    def status(self) -> StatusReply:
        return StatusReply(
            session_id=self.session_id,
            data_seq=self.last_seq,
            ingested_seq=self.ingested_seq,
            context_tokens=self.computed_tokens,
            pending_tokens=max(self.pending_tokens, self._tokens_after(self.ingested_seq)),
            window=self.window,
            prompt_tokens=self.opening_tokens,
            entries=len(self.entries),
            first_seq=self.entries[0][0] if self.entries else 0,
            dropped_entries=self.dropped,
            template=self.template,  # type: ignore[arg-type]
            format=self.format,  # type: ignore[arg-type]
            error=self.error,
        )


class SlotAllocator:
    """Ids for sessions on the ring. Never reused, so a late report about a closed session
    can't be mistaken for one about a new session."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        if self._next >= 0xFFFF_FFFF:
            raise OverflowError("session slots exhausted")
        self._next += 1
        return self._next
