"""The host side of a captured step, on the CPU: what the staging buffers hold for a question
and for a padded decode batch, and that a cached block table is re-staged whenever the KV
manager changes it."""

from __future__ import annotations

import numpy as np
import torch

from livelm.daemon.engine.block_pool import SCRATCH_BLOCK, BlockPool
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.kv_manager import KVManager
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.engine.sequence import QueryState, SessionState
from livelm.daemon.engine.staging import StagingArrays, StepStaging
from livelm.daemon.model.presets import preset_config

BS, ROWS, SEQS, WIDTH = 4, 16, 4, 32


def staging() -> StepStaging:
    arrays = StagingArrays(
        ids=np.full(ROWS, -1, np.int64), pos=np.full(ROWS, -1, np.int64),
        slots=np.full(ROWS, -1, np.int64), last=np.full(SEQS, -1, np.int64),
        ctx=np.full(SEQS, -1, np.int32), tables=np.full((SEQS, WIDTH), -1, np.int32),
        starts=np.full(SEQS + 1, -1, np.int32),
    )
    return StepStaging(arrays, BS)


def kv(blocks: int = 64) -> KVManager:
    cache = KVCache(preset_config("random:tiny"), blocks, BS, torch.float32, torch.device("cpu"))
    return KVManager(BlockPool(blocks), cache)


def session(manager: KVManager, tokens: int) -> SessionState:
    s = SessionState(tokens=list(range(100, 100 + tokens)))
    manager.prepare_write(s, 0, tokens)
    s.num_computed = tokens
    return s


def test_a_question_chunk_and_its_padding_rows() -> None:
    m, st = kv(), staging()
    s = session(m, 10)
    q = QueryState(tokens=[7, 8, 9], base=10)
    m.fork(s, 10, into=q)
    m.prepare_write(q, 10, 13)
    width = st.fill([Chunk(q, 10, 3, True)], seqs=1, per_seq=8)
    a = st.a
    assert width == len(q.block_table) == 4
    assert a.ids[:8].tolist() == [7, 8, 9, 0, 0, 0, 0, 0]
    assert a.pos[:3].tolist() == [10, 11, 12]
    table = q.block_table
    assert a.slots[:3].tolist() == [table[p // BS] * BS + p % BS for p in (10, 11, 12)]
    assert set(a.slots[3:8].tolist()) == {SCRATCH_BLOCK * BS}  # padding rows write scratch
    assert a.last[0] == 2 and a.ctx[0] == 10 + 8
    assert a.tables[0, :4].tolist() == table


def test_a_decode_batch_pads_sequences_into_the_scratch_block() -> None:
    m, st = kv(), staging()
    seqs = [session(m, n) for n in (5, 9)]
    for s in seqs:
        m.prepare_write(s, s.length, s.length + 1)
        s.tokens.append(1)
    st.fill([Chunk(s, s.length - 1, 1, True) for s in seqs], seqs=4, per_seq=1)
    a = st.a
    assert a.pos[:2].tolist() == [5, 9] and a.ctx[:4].tolist() == [6, 10, 1, 1]
    assert a.last[:4].tolist() == [0, 1, 2, 3]
    assert a.tables[2, 0] == a.tables[3, 0] == SCRATCH_BLOCK


def test_a_cached_table_is_restaged_after_every_change() -> None:
    m, st = kv(), staging()
    s = session(m, 7)
    other = session(m, 3)

    def staged_row(slot: int, seq: SessionState) -> list[int]:
        return st.a.tables[slot, : len(seq.block_table)].tolist()

    def step(*chunks: SessionState) -> None:
        st.fill([Chunk(c, c.length - 1, 1, True) for c in chunks], seqs=len(chunks), per_seq=1)

    step(s)
    st.a.tables[0, 0] = -7  # a row not rewritten keeps this mark
    step(s)
    assert st.a.tables[0, 0] == -7, "an unchanged table is not copied again"
    m.prepare_write(s, 7, 9)  # a new block
    step(s)
    assert staged_row(0, s) == s.block_table
    q = QueryState(tokens=[1], base=4)
    m.fork(s, 4, into=q)  # shares s's first block: s's next write there copies it
    m.truncate(s, 4)
    s.tokens = s.tokens[:4]
    m.prepare_write(s, 3, 4)  # copy-on-write of the shared block
    assert s.block_table[0] != q.block_table[0]
    step(s)
    assert staged_row(0, s) == s.block_table
    step(other, s)  # the slots swap sequences
    assert staged_row(0, other) == other.block_table and staged_row(1, s) == s.block_table
    st.fill([], seqs=2, per_seq=1)  # padding takes both slots
    step(other, s)
    assert staged_row(0, other) == other.block_table and staged_row(1, s) == s.block_table
    s.block_table = list(other.block_table)  # a table assigned anew, not through the manager
    step(other, s)
    assert staged_row(1, s) == other.block_table


def test_sessions_data_packed_back_to_back_then_a_padding_sequence() -> None:
    m, st = kv(), staging()
    a_, b_ = session(m, 6), session(m, 3)
    for s, new in ((a_, 5), (b_, 2)):
        s.tokens += list(range(200, 200 + new))
        m.prepare_write(s, s.num_computed, s.num_computed + new)
    width = st.fill_packed([Chunk(a_, 6, 5, False), Chunk(b_, 3, 2, False)], seqs=4, rows=12)
    a = st.a
    assert a.starts.tolist() == [0, 5, 7, 12, 12]  # two chunks, the padding one, one empty
    assert a.ids[:7].tolist() == [200, 201, 202, 203, 204, 200, 201]
    assert a.pos[:12].tolist() == [6, 7, 8, 9, 10, 3, 4, 0, 1, 2, 3, 4]
    assert a.ctx.tolist() == [11, 5, 5, 0]
    ta, tb = a_.block_table, b_.block_table
    assert a.slots[:7].tolist() == ([ta[p // BS] * BS + p % BS for p in range(6, 11)]
                                    + [tb[p // BS] * BS + p % BS for p in (3, 4)])
    assert set(a.slots[7:12].tolist()) == {SCRATCH_BLOCK * BS}  # padding rows write scratch
    assert a.tables[0, : len(ta)].tolist() == ta and a.tables[1, : len(tb)].tolist() == tb
    assert a.tables[2, :2].tolist() == [SCRATCH_BLOCK] * 2  # 5 padding rows over 4-token blocks
    assert width == max(len(ta), len(tb), 2)


def test_a_full_packed_step_leaves_the_padding_sequence_empty() -> None:
    m, st = kv(), staging()
    s = session(m, 4)
    s.tokens += [9, 9, 9]
    m.prepare_write(s, 4, 7)
    st.fill_packed([Chunk(s, 4, 3, False)], seqs=2, rows=3)
    assert st.a.starts[:3].tolist() == [0, 3, 3] and st.a.ctx[:2].tolist() == [7, 0]
