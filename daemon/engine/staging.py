"""The host side of a captured step: filling the staging buffers a graph's inputs are copied
from, for a batch of chunks padded to the graph's shape.

Rows past a chunk's real tokens and sequences past the real batch are padding: they write only
the scratch block and nothing reads their results. A sequence's block table is copied only
when that batch slot last held another sequence or its table changed since (a new list, or a
``table_version`` bump by the KV manager), so a decode batch of long contexts does not
rewrite thousands of entries every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livelm.daemon.engine.block_pool import SCRATCH_BLOCK
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.engine.sequence import Sequence


@dataclass
class StagingArrays:
    """Views of the pinned host buffers: ids, pos and slots [rows]; last [seqs] (each sequence's
    last real row); ctx [seqs] (its context after the step); tables [seqs, width]; starts
    [seqs + 1] (each sequence's first row, for steps that pack sequences of any length)."""

    ids: np.ndarray
    pos: np.ndarray
    slots: np.ndarray
    last: np.ndarray
    ctx: np.ndarray
    tables: np.ndarray
    starts: np.ndarray


class StepStaging:
    def __init__(self, arrays: StagingArrays, block_size: int) -> None:
        self.a = arrays
        self.block_size = block_size
        # per batch slot: the sequence and table list whose entries the slot's row holds, and
        # that table's version (a table assigned anew is a new list, so it is seen too)
        self._held: list[tuple[Sequence, list[int], int] | None] = [None] * len(arrays.tables)

    def fill(self, chunks: list[Chunk], seqs: int, per_seq: int) -> int:
        """Stages ``chunks`` as a (seqs x per_seq) step; returns the table width to copy."""
        a, bs = self.a, self.block_size
        a.slots[: seqs * per_seq] = SCRATCH_BLOCK * bs  # padding rows write to scratch
        a.ids[: seqs * per_seq] = 0
        width = -(-per_seq // bs)
        for b, ch in enumerate(chunks):
            row = b * per_seq
            span = range(ch.start, ch.start + ch.length)
            table = ch.seq.block_table
            a.ids[row : row + ch.length] = ch.seq.token_slice(ch.start, ch.length)
            a.pos[row : row + per_seq] = ch.start  # padding rows: any position in the table
            a.pos[row : row + ch.length] = span
            a.slots[row : row + ch.length] = [table[p // bs] * bs + p % bs for p in span]
            a.last[b] = row + ch.length - 1
            a.ctx[b] = ch.start + per_seq  # real rows sit at their true positions
            self._stage_table(b, ch.seq)
            width = max(width, len(table))
        for b in range(len(chunks), seqs):  # padding sequences live in the scratch block
            a.pos[b * per_seq : (b + 1) * per_seq] = range(per_seq)
            a.last[b] = b * per_seq
            a.ctx[b] = per_seq
            a.tables[b, : -(-per_seq // bs)] = SCRATCH_BLOCK
            self._held[b] = None
        return width

    def fill_packed(self, chunks: list[Chunk], seqs: int, rows: int) -> int:
        """Stages ``chunks`` packed back to back into ``rows`` rows over ``seqs`` sequences:
        the chunks first, then one padding sequence holding the rows left (in the scratch
        block, at positions from 0), then empty sequences. Needs len(chunks) < seqs and their
        tokens <= rows. Returns the table width to copy."""
        a, bs = self.a, self.block_size
        a.slots[:rows] = SCRATCH_BLOCK * bs
        a.ids[:rows] = 0
        row, width = 0, 1
        for b, ch in enumerate(chunks):
            end = row + ch.length
            span = range(ch.start, ch.start + ch.length)
            table = ch.seq.block_table
            a.starts[b] = row
            a.ids[row:end] = ch.seq.token_slice(ch.start, ch.length)
            a.pos[row:end] = span
            a.slots[row:end] = [table[p // bs] * bs + p % bs for p in span]
            a.ctx[b] = ch.start + ch.length
            self._stage_table(b, ch.seq)
            width = max(width, len(table))
            row = end
        pad, b = rows - row, len(chunks)
        a.starts[b] = row
        a.pos[row:rows] = range(pad)
        a.ctx[b] = pad
        a.tables[b, : max(1, -(-pad // bs))] = SCRATCH_BLOCK
        self._held[b] = None
        a.starts[b + 1 : seqs + 1] = rows
        a.ctx[b + 1 : seqs] = 0
        return max(width, -(-pad // bs))

    def _stage_table(self, slot: int, seq: Sequence) -> None:
        held, table = self._held[slot], seq.block_table
        if held is not None and held[0] is seq and held[1] is table and held[2] == seq.table_version:
            return
        self.a.tables[slot, : len(table)] = table
        self._held[slot] = (seq, table, seq.table_version)
