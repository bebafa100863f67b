"""Block reference counts and a session's fork boundary: the worker's bookkeeping on its own."""

from __future__ import annotations

import random

import pytest

from livelm.daemon.engine.block_pool import SCRATCH_BLOCK, BlockPool
from livelm.daemon.engine.sequence import SessionState
from livelm.protocol.errors import InternalError


def test_blocks_are_handed_out_low_first_and_never_scratch() -> None:
    pool = BlockPool(6)
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(0) == []
    assert pool.num_free == 2 and pool.refcount(SCRATCH_BLOCK) == 1


def test_a_shared_block_is_free_only_after_its_last_holder_lets_go() -> None:
    pool = BlockPool(5)
    table = pool.allocate(2)
    pool.share(table)
    assert [pool.refcount(b) for b in table] == [2, 2]
    pool.release(table)
    assert pool.num_free == 2 and [pool.refcount(b) for b in table] == [1, 1]
    pool.release(table[:1])
    assert pool.num_free == 3 and pool.refcount(table[0]) == 0
    assert pool.allocate(1) == table[:1]  # the freed block is handed out again


def test_over_release_is_refused_and_changes_nothing() -> None:
    pool = BlockPool(5)
    a, b = pool.allocate(2)
    pool.release([a])
    with pytest.raises(InternalError, match=f"block {a} released more often"):
        pool.release([b, a])
    assert pool.refcount(b) == 1 and pool.num_free == 3


def test_exhaustion_is_an_error() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(InternalError, match="KV pool exhausted"):
        pool.allocate(1)


def _boundary_by_definition(s: SessionState, limit: int) -> tuple[int, int]:
    end, seen = s.opening_len, s.first_kept_seq - 1
    for seq, entry_end in s.entries:
        if seq > s.ingested_seq or entry_end > limit:
            break
        end, seen = entry_end, seq
    return end, seen


def test_boundary_is_the_newest_ingested_entry_under_the_limit() -> None:
    rng = random.Random(7)
    for _ in range(300):
        s = SessionState(tokens=[1] * rng.randint(0, 5))
        s.opening_len = len(s.tokens)
        s.first_kept_seq = rng.randint(1, 4)
        for seq in range(s.first_kept_seq, s.first_kept_seq + rng.randint(0, 12)):
            s.append_entry(seq, [2] * rng.randint(1, 6))
        s.ingested_seq = rng.randint(0, s.first_kept_seq + 12)
        limit = rng.randint(0, len(s.tokens) + 3)
        assert s.boundary(limit) == _boundary_by_definition(s, limit)


def test_ingested_seq_is_the_newest_entry_computed_with_all_before_it() -> None:
    rng = random.Random(11)
    for _ in range(300):
        s = SessionState(tokens=[1] * rng.randint(0, 5))
        s.opening_len = len(s.tokens)
        first = rng.randint(1, 4)
        for seq in range(first, first + rng.randint(0, 12)):
            s.append_entry(seq, [2] * rng.randint(1, 6))
        s.ingested_seq = before = rng.randint(0, first)
        s.num_computed = rng.randint(0, len(s.tokens))
        s.advance_ingested()
        done = [seq for seq, end in s.entries if end <= s.num_computed]  # a prefix: ends grow
        assert s.ingested_seq == max([before, *done])
