"""Forks' partial-block copies: one at a time, or held and run as one batch."""

from __future__ import annotations

import torch

from livelm.daemon.engine.block_pool import BlockPool
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.kv_manager import KVManager
from livelm.daemon.engine.sequence import QueryState, SessionState
from livelm.daemon.model.presets import preset_config

BS = 4


def manager(blocks: int = 64) -> KVManager:
    cache = KVCache(preset_config("random:tiny"), blocks, BS, torch.float32, torch.device("cpu"))
    cache.storage.normal_()  # every block distinct, so a wrong or missing copy shows
    return KVManager(BlockPool(blocks), cache)


def session(m: KVManager, tokens: int) -> SessionState:
    s = SessionState(tokens=list(range(tokens)))
    m.prepare_write(s, 0, tokens)
    s.num_computed = tokens
    return s


def block(m: KVManager, index: int) -> torch.Tensor:
    return m.cache.storage[:, :, index].clone()


def test_a_fork_outside_a_batch_copies_its_partial_block_at_once() -> None:
    m = manager()
    s = session(m, 10)
    q = QueryState(tokens=[])
    m.fork(s, 10, into=q)
    assert q.block_table[:2] == s.block_table[:2]  # full blocks shared
    assert q.block_table[2] != s.block_table[2]
    assert torch.equal(block(m, q.block_table[2]), block(m, s.block_table[2]))


def test_forks_in_a_batch_copy_together_on_leaving() -> None:
    m = manager()
    sessions = [session(m, n) for n in (5, 7, 9, 12, 3)]  # 12: no partial block to copy
    queries = [QueryState(tokens=[]) for _ in sessions]
    with m.batched_copies():
        for s, q in zip(sessions, queries, strict=True):
            m.fork(s, s.num_computed, into=q)
        copied = [q.block_table[-1] for s, q in zip(sessions, queries, strict=True)
                  if s.num_computed % BS]
        before = [block(m, b) for b in copied]
    partial = [(s, q) for s, q in zip(sessions, queries, strict=True) if s.num_computed % BS]
    assert len(partial) == 4
    for (s, q), held in zip(partial, before, strict=True):
        source = block(m, s.block_table[-1])
        assert not torch.equal(held, source)  # not copied while the batch was open
        assert torch.equal(block(m, q.block_table[-1]), source)
    assert queries[3].block_table == sessions[3].block_table  # whole blocks: all shared


def test_copy_blocks_matches_one_copy_at_a_time() -> None:
    a, b = manager(), manager()
    b.cache.storage.copy_(a.cache.storage)
    pairs = [(3, 10), (3, 11), (7, 12), (1, 13)]  # one source may feed several forks
    a.cache.copy_blocks(pairs)
    for src, dst in pairs:
        b.cache.copy_block(src, dst)
    assert torch.equal(a.cache.storage, b.cache.storage)
