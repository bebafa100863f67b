"""Records carried by the native ring from the event loop to the worker, as uint32 words.

Each record is a 4-word header (kind, session slot, argument, payload length) followed by
its payload. Ordering in the ring is the ordering the worker applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

HEADER_WORDS = 4


class Kind(IntEnum):
    OPEN = 1  # payload: the session's opening tokens
    DATA = 2  # argument: entry seq; payload: the entry's tokens
    TRIM = 3  # argument: first seq to keep; entries below it are dropped
    CLOSE = 4
    # a new session (slot) from another's first tokens; argument: the source slot;
    # payload: [how many of the source's tokens it keeps, then its own new tokens...]
    BRANCH = 5


@dataclass(frozen=True)
class Record:
    kind: Kind
    slot: int
    arg: int
    tokens: list[int]


def encode(kind: Kind, slot: int, arg: int = 0, tokens: list[int] | None = None) -> np.ndarray:
    payload = tokens or []
    words = np.empty(HEADER_WORDS + len(payload), dtype=np.uint32)
    words[:HEADER_WORDS] = (int(kind), slot, arg, len(payload))
    words[HEADER_WORDS:] = payload
    return words


def decode_all(words: np.ndarray) -> list[Record]:
    """Splits a span of whole records (the producer only ever writes whole records)."""
    out: list[Record] = []
    pos, end = 0, len(words)
    while pos < end:
        kind, slot, arg, length = (int(w) for w in words[pos : pos + HEADER_WORDS])
        start = pos + HEADER_WORDS
        out.append(Record(Kind(kind), slot, arg, words[start : start + length].tolist()))
        pos = start + length
    return out
