"""Flattens a step's chunks into the decoder's inputs and the attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.kernels.attention_meta import AttentionMeta


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMeta
    sample_rows: list[int]  # row of each chunk with sample=True, in chunk order
    score_rows: list[int]  # every row of the chunks with score=True, in chunk order
    score_targets: list[int]  # the token whose log-probability each score row gives


TABLE_ALIGN = 16


def padded_width(blocks: int) -> int:
    """Block tables are padded to a multiple of 16 entries: the kernels are compiled for a
    row stride divisible by 16, and one stride class means no recompile when it changes."""
    return -(-max(blocks, 1) // TABLE_ALIGN) * TABLE_ALIGN


def build_batch(chunks: list[Chunk], block_size: int, device: torch.device) -> Batch:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    context: list[int] = []
    for ch in chunks:
        table = ch.seq.block_table
        span = range(ch.start, ch.start + ch.length)
        ids += ch.seq.token_slice(ch.start, ch.length)
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        starts.append(starts[-1] + ch.length)
        context.append(ch.start + ch.length)
    width = padded_width(max(len(ch.seq.block_table) for ch in chunks))
    tables = [ch.seq.block_table + [0] * (width - len(ch.seq.block_table)) for ch in chunks]
    meta = AttentionMeta(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_starts=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        query_starts_list=starts,
        context_lens_list=context,
        decode_only=all(ch.length == 1 for ch in chunks),
    )
    rows = [starts[i + 1] - 1 for i, ch in enumerate(chunks) if ch.sample]
    score_rows: list[int] = []
    score_targets: list[int] = []
    for i, ch in enumerate(chunks):
        if ch.score:
            score_rows += range(starts[i], starts[i + 1])
            offset = ch.start - ch.seq.base
            score_targets += ch.seq.targets[offset : offset + ch.length]
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        meta=meta,
        sample_rows=rows,
        score_rows=score_rows,
        score_targets=score_targets,
    )
