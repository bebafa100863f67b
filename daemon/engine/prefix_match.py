"""The conversations a completion may reuse, and finding the longest shared prefix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Conversation:
    """An internal session holding a recent completion's prompt but its last token."""

    slot: int
    tokens: np.ndarray  # int64; what the worker holds once every record written is applied
    last_seq: int = 0  # seq of its newest DATA record (0: only its opening)
    reserved_blocks: int = 0
    users: int = 0  # queries running over it: it is not evicted while any is
    last_used: int = 0  # a tick of the table's clock, for least-recently-used eviction
    broken: bool = False  # a query over it failed: never reused, dropped once idle

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def longest_prefix(
    conversations: list[Conversation], prompt: np.ndarray, cap: int
) -> tuple[Conversation | None, int]:
    """The conversation sharing the longest prefix with ``prompt`` (at most ``cap`` tokens);
    among equals, one it extends whole (no branch), then the most recently used."""
    best, best_key = None, (0, False, 0)
    for conv in conversations:
        if conv.broken:
            continue
        matched = min(common_prefix(conv.tokens, prompt), cap)
        key = (matched, matched == len(conv), conv.last_used)
        if matched > 0 and key > best_key:
            best, best_key = conv, key
    return best, best_key[0]
