"""Block tables over the pool: growing a sequence, forking a query, copy-on-write, release.

This is the only writer of a sequence's ``block_table``; each change bumps its
``table_version``, which tells the graph staging when a table must be copied again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from livelm.daemon.engine.block_pool import BlockPool
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.sequence import Sequence


class KVManager:
    def __init__(self, pool: BlockPool, cache: KVCache) -> None:
        self.pool = pool
        self.cache = cache
        self.block_size = cache.block_size
        self._deferred: list[tuple[int, int]] | None = None  # fork copies held for one batch

    @contextmanager
    def batched_copies(self) -> Iterator[None]:
        """The partial-block copies of the forks made inside run together on leaving (two
        launches for any number of forks), before any step can read those blocks."""
        self._deferred = []
        try:
            yield
        finally:
            pairs, self._deferred = self._deferred, None
            self.cache.copy_blocks(pairs)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def prepare_write(self, seq: Sequence, start: int, end: int) -> None:
        """Makes positions start..end-1 writable: new blocks, and a private copy of a shared tail."""
        first = start // self.block_size
        if first < len(seq.block_table) and self.pool.refcount(seq.block_table[first]) > 1:
            self._copy_on_write(seq, first)
        missing = self.blocks_for(end) - len(seq.block_table)
        if missing > 0:
            seq.block_table += self.pool.allocate(missing)
            seq.table_version += 1

    def fork(self, source: Sequence, length: int, into: Sequence) -> None:
        """Gives ``into`` the first ``length`` tokens of ``source``'s KV: full blocks shared,
        a partial last block copied."""
        full = length // self.block_size
        shared = source.block_table[:full]
        self.pool.share(shared)
        table = list(shared)
        if length % self.block_size:
            (copy,) = self.pool.allocate(1)
            if self._deferred is None:
                self.cache.copy_block(source.block_table[full], copy)
            else:
                self._deferred.append((source.block_table[full], copy))
            table.append(copy)
        into.block_table = table
        into.table_version += 1
        into.num_computed = length

    def truncate(self, seq: Sequence, length: int) -> None:
        keep = self.blocks_for(length)
        self.pool.release(seq.block_table[keep:])
        del seq.block_table[keep:]
        seq.table_version += 1

    def release(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.table_version += 1

    def _copy_on_write(self, seq: Sequence, index: int) -> None:
        old = seq.block_table[index]
        (new,) = self.pool.allocate(1)
        self.cache.copy_block(old, new)
        self.pool.release([old])
        seq.block_table[index] = new
        seq.table_version += 1
