"""KV-block admission on the event loop: work is accepted only when its blocks are there.

The worker then never runs out of blocks mid-step; a push that does not fit is refused
before it is acknowledged, and a query that does not fit is told to retry.
"""

from __future__ import annotations

from livelm.protocol.errors import ContextFull, Overloaded


class BlockBudget:
    def __init__(self, total_blocks: int, block_size: int) -> None:
        self.total = total_blocks
        self.block_size = block_size
        self.reserved = 0

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
        if needed - current > self.available:
            raise ContextFull(
                f"the KV cache is full: this needs {needed - current} more blocks of "
                f"{self.block_size} tokens and {self.available} are free; close sessions "
                "or use smaller windows"
            )
        self.reserved += needed - current

    def reserve_query(self, blocks: int) -> None:
        if blocks > self.available:
            raise Overloaded(
                f"the KV cache is busy: the query needs {blocks} blocks, {self.available} free",
                retry_after=1.0,
            )
        self.reserved += blocks

    def release(self, blocks: int) -> None:
        self.reserved -= blocks
