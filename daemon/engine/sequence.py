"""Worker-side state: a session's context in the KV pool, and a query forked from it."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livelm.daemon.engine.choices import Choices
    from livelm.daemon.engine.sampling import SamplingParams


@dataclass
class Sequence:
    """Tokens laid out in blocks; ``num_computed`` of them have their K/V in the pool."""

    tokens: list[int]
    base: int = 0  # absolute position of tokens[0] (a query holds only its own tokens)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    table_version: int = 0  # bumped by KVManager whenever it changes block_table

    @property
    def length(self) -> int:
        return self.base + len(self.tokens)

    @property
    def pending(self) -> int:
        return self.length - self.num_computed

    def token_slice(self, start: int, count: int) -> list[int]:
        return self.tokens[start - self.base : start - self.base + count]


@dataclass
class SessionState(Sequence):
    slot: int = 0
    opening_len: int = 0
    # (seq, end index into tokens) of each retained entry, oldest first
    entries: deque[tuple[int, int]] = field(default_factory=deque)
    first_kept_seq: int = 1
    ingested_seq: int = 0
    # the last progress told to the event loop
    reported: tuple[int, int, int, str | None] = (-1, -1, -1, None)
    error: str | None = None  # set when computing this session failed; it then stops advancing

    def append_entry(self, seq: int, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        self.entries.append((seq, len(self.tokens)))

    def advance_ingested(self) -> None:
        """ingested_seq: the newest entry whose tokens, and all before it, are computed.

        Ends grow along the deque, so the computed entries are a prefix: scanning from the
        newest stops at its last one after the entries still pending, where a scan from the
        oldest would walk the whole context every step (0.24 ms at 34k tokens, 650 entries)."""
        for seq, end in reversed(self.entries):
            if end <= self.num_computed:
                self.ingested_seq = max(self.ingested_seq, seq)
                return

    def caught_up(self, target_seq: int) -> bool:
        return self.num_computed >= self.opening_len and self.ingested_seq >= target_seq

    def boundary(self, limit: int) -> tuple[int, int]:
        """Where a query forks: the end of the newest fully computed entry that leaves the
        query room under ``limit`` tokens, as (token count, seq of that entry)."""
        # both seq and end grow along the deque, so the entries that qualify are a prefix:
        # scanning from the newest finds its last one after a few steps in the usual case
        for seq, entry_end in reversed(self.entries):
            if seq <= self.ingested_seq and entry_end <= limit:
                return entry_end, seq
        return self.opening_len, self.first_kept_seq - 1

    def trim(self, first_kept_seq: int) -> bool:
        """Drops entries below first_kept_seq; returns whether the KV must be rebuilt."""
        self.first_kept_seq = max(self.first_kept_seq, first_kept_seq)
        kept = [(seq, end) for seq, end in self.entries if seq >= self.first_kept_seq]
        dropped = len(self.entries) - len(kept)
        if dropped == 0:
            return False
        cut = self.opening_len
        start = self.entries[dropped - 1][1]  # end of the newest dropped entry
        self.tokens = self.tokens[:cut] + self.tokens[start:]
        self.entries = deque((seq, end - (start - cut)) for seq, end in kept)
        self.num_computed = min(self.num_computed, cut)
        self.ingested_seq = self.first_kept_seq - 1
        return True


class Phase(enum.Enum):
    WAITING = 1  # for its session to ingest the data it must see
    PREFILL = 2
    DECODE = 3
    SCORE = 4  # a classification scores the rest of its multi-token choices
    DONE = 5


@dataclass
class QueryState(Sequence):
    query_id: int = 0
    slot: int = 0
    target_seq: int = 0
    question: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    phase: Phase = Phase.WAITING
    data_seq: int = 0
    context_len: int = 0  # session tokens the query forked over
    output: list[int] = field(default_factory=list)
    capture_logits: bool = False
    fork_at: int | None = None  # fork exactly here, not at the newest entry (completions)
    choices: Choices | None = None  # set for a classification
    choice_logprobs: list[float] = field(default_factory=list)  # summed so far, per choice
    scoring: list[ChoiceState] = field(default_factory=list)  # forks scoring multi-token choices


@dataclass
class ChoiceState(Sequence):
    """One multi-token choice forked over its query's question: its tokens but the last are
    fed, and each row's log-probability of the next choice token is summed."""

    query_id: int = 0
    index: int = 0  # into the query's choices
    targets: list[int] = field(default_factory=list)  # the token each fed row predicts
