"""KV-block admission on the event loop: work is accepted only when its blocks are there.

The worker then never runs out of blocks mid-step; a push that does not fit is refused
before it is acknowledged, and a query that does not fit is told to retry, or, when live
sessions hold so much that it could never fit, that the cache is full. Sessions never take the
last ``query_reserve`` blocks, so a query on a full session still runs.
"""

from __future__ import annotations

from livelm.protocol.errors import ContextFull, Overloaded

# blocks that live sessions may not take, so that a query on a full session still fits: room
# for this many tokens, or an eighth of a small pool
QUERY_RESERVE_TOKENS = 4096


class BlockBudget:
    def __init__(self, total_blocks: int, block_size: int) -> None:
        self.total = total_blocks
        self.block_size = block_size
        self.reserved = 0
        self.held_by_sessions = 0  # of ``reserved``: live sessions' blocks, which only a close frees
        self.query_reserve = min(self.blocks_for(QUERY_RESERVE_TOKENS) + 1, total_blocks // 8)

    @property
    def available(self) -> int:
        return self.total - self.reserved

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def session_blocks(self, tokens: int) -> int:
        return self.blocks_for(tokens) + 1  # one spare for copy-on-write of a shared tail

    def query_blocks(self, context_tokens: int, new_tokens: int) -> int:
        return self.blocks_for(context_tokens % self.block_size + new_tokens) + 1

    def grow_session(self, current: int, needed: int) -> None:
        """For blocks that can be taken back (kept conversations): up to the whole pool."""
        if needed - current > self.available:
            raise ContextFull(
                f"the KV cache is full: this needs {needed - current} more blocks of "
                f"{self.block_size} tokens and {self.available} are free; close sessions "
                "or use smaller windows"
            )
        self.reserved += needed - current

    def grow_live_session(self, current: int, needed: int) -> None:
        """For a live session's blocks: never into the part of the pool kept for queries.
        Short of room that only queries hold for now: ``Overloaded`` (retry), not full."""
        growth = needed - current
        room = self.total - self.query_reserve - self.held_by_sessions
        if growth > room:
            raise ContextFull(
                f"the KV cache is full: this needs {growth} more blocks of "
                f"{self.block_size} tokens; sessions hold {self.held_by_sessions} of "
                f"{self.total} and {self.query_reserve} stay free for queries; close sessions "
                "or use smaller windows"
            )
        self._reserve_now(growth, "this push")
        self.held_by_sessions += growth

    def release_live_session(self, blocks: int) -> None:
        self.held_by_sessions -= blocks
        self.release(blocks)

    def pin(self, blocks: int) -> None:
        """Blocks that running queries still read after their session let go of them (a
        window trim, before its rebuild): reserved until ``release``d when they end."""
        self._reserve_now(blocks, "a window trim while queries read the old context")

    def unhold(self, blocks: int) -> None:
        """A closed session's blocks that running queries still read: reserved on, but no
        longer a live session's (``release`` them when the queries end)."""
        self.held_by_sessions -= blocks

    def _reserve_now(self, blocks: int, what: str) -> None:
        if blocks > self.available:
            raise Overloaded(
                f"the KV cache is busy: {what} needs {blocks} blocks of {self.block_size} "
                f"tokens, {self.available} are free until running queries end",
                retry_after=1.0,
            )
        self.reserved += blocks

    def reserve_query(self, blocks: int) -> None:
        if blocks > self.total - self.held_by_sessions:  # waiting would not help
            raise ContextFull(
                f"the query needs {blocks} blocks of {self.block_size} tokens and sessions "
                f"hold {self.held_by_sessions} of the cache's {self.total}; ask for fewer "
                "tokens, or close sessions"
            )
        if blocks > self.available:
            raise Overloaded(
                f"the KV cache is busy: the query needs {blocks} blocks, {self.available} free",
                retry_after=1.0,
            )
        self.reserved += blocks

    def release(self, blocks: int) -> None:
        self.reserved -= blocks
