"""Paged attention inputs for the kernel tests: random queries over a paged KV cache whose
blocks are handed out in scrambled order and whose slots outside every context hold NaN."""

from __future__ import annotations

import math

import torch

from livelm.daemon.kernels.attention_meta import AttentionMeta
from tests.triton_interpret import DEVICE


def paged_batch(
    q_lens: list[int], ctx_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: torch.device = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta]:
    """Random q and cache; blocks scrambled; every cache slot outside a context holds NaN."""
    per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype, device=device)
    v_cache = torch.full(shape, math.nan, dtype=dtype, device=device)
    order = torch.randperm(num_blocks - 1, device=device)  # the last block: table padding
    pad = num_blocks - 1
    table = torch.full((len(ctx_lens), max(per_seq) + 2), pad, dtype=torch.int32, device=device)
    slots, used = [], 0
    for b, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        blocks = order[used:used + per_seq[b]]
        used += per_seq[b]
        table[b, :per_seq[b]] = blocks.to(torch.int32)
        pos = torch.arange(ctx, device=device)
        flat = blocks[pos // block_size] * block_size + pos % block_size
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(
                ctx, num_kv_heads, head_dim, device=device).to(dtype)
        slots.append(flat[ctx - q_len:])
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    meta = AttentionMeta(
        slot_mapping=torch.cat(slots).long(),
        query_starts=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=table,
        query_starts_list=starts,
        context_lens_list=list(ctx_lens),
        decode_only=all(n == 1 for n in q_lens),
    )
    q = torch.randn(starts[-1], num_heads, head_dim, device=device).to(dtype)
    return q, k_cache, v_cache, meta
