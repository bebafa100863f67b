"""Flash attention for a varlen batch of query chunks over the paged KV cache.

A program owns a tile of BLOCK_M rows: BLOCK_Q consecutive queries of one sequence times the
GROUP query heads that share one kv head (row = query * GROUP + head in group), so every K/V
tile it loads serves the whole group. Grid: (virtual query tile, kv head, key split).

Virtual tiles: sequence b's tiles start at query_starts[b] // BLOCK_Q + b, which never overlaps
the next sequence's start, so the grid (N // BLOCK_Q + B) comes from host sizes and a program
finds its sequence by binary search over query_starts on the device; gaps exit at once.

Key tiles are walked in three runs: the masked ones before the window's fully visible span,
the fully visible ones (no mask arithmetic), and the masked ones on the causal diagonal.
When the batch has too few tiles to fill the GPU (a short question over a long context),
each program takes one of several key splits and a second kernel merges them.

``paged_prefill_attention_tma`` is the same kernel loading each key tile with one TMA
descriptor copy instead of pointer gathers, for KV blocks of exactly one tile (``tma.PAGE``
tokens); it does so in unsplit launches only (see its docstring), and is bound first where
it is admitted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.triton_backend import pdl, tma
from livelm.daemon.kernels.triton_backend.paged_decode import (
    LOG2E,
    check_caches,
    choose_splits,
    combine_splits,
    dot_flags,
    mma,
    split_slots,
    split_workspace,
    tile_pages,
)
from livelm.daemon.kernels.triton_backend.pdl import wait_for_producer

SPLIT_PROGRAMS_PER_SM = 2
MAX_ROWS = 128
LAZY_RESCALE = True  # defer the online softmax's rescaling where it measured faster
RESCALE_LOG2 = tl.constexpr(8.0)  # how far (log2) a row's maximum may outgrow its reference
CARRY_PAGES = True  # look up a key tile's pages one iteration ahead (``_attend_tiles``)
# whether a split launch may load by TMA (``paged_prefill_attention_tma``). Off: splits serve
# short questions, where pointer loads measured faster. A long chunk whose programs end in a
# thin last wave (1105 queries over 8k keys: 560 programs, 264 resident on an H200) gained only
# 5% split in two by TMA (376 against 396 us; by pointer 508), so long chunks stay unsplit
TMA_IN_SPLITS = False
# walk the query tiles last first: under a causal mask a chunk's later tiles see the most keys,
# and launched last they leave a ragged final wave (longest-processing-time-first order).
# H200, ``prefill_sweep.py --ab-order``: 4096 queries over 7100 / 8205 / 19000 / 32000 keys
# 761 / 930 / 2504 / 4400 us against 821 / 980 / 2592 / 4500 in order; 1105 queries 1-3% faster
LONGEST_FIRST = True


@triton.jit
def _find_sequence(query_starts, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first virtual tile (query_starts[b] // BLOCK_Q + b) <= tile."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while lo < hi - 1:
        mid = (lo + hi) // 2
        first = tl.load(query_starts + mid).to(tl.int32) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid)
    return lo


@triton.jit
def _load_kv(k_cache, v_cache, k_desc, v_desc, page, t, ctx, kv_head,
             stride_kb, stride_ks, stride_kh, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """Key tile t from its pages (``tile_pages``): K as [HEAD_DIM, BLOCK_N] and V as
    [BLOCK_N, HEAD_DIM]; keys at or past ctx read as zeros. TMA: one descriptor load per
    tensor (a page is one tile, BLOCK_SIZE == BLOCK_N); else pointer loads."""
    keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < ctx
    dims = tl.arange(0, HEAD_DIM)
    if TMA:
        k = tl.trans(k_desc.load([page, kv_head * HEAD_DIM]))
        v = v_desc.load([page, kv_head * HEAD_DIM])
        if MASKED:  # a page's slots past the context hold stale (even NaN) values
            k = tl.where(key_ok[None, :], k, 0.0)
            v = tl.where(key_ok[:, None], v, 0.0)
    else:
        kv_off = page * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        if MASKED:
            k = tl.load(k_cache + kv_off[None, :] + dims[:, None], mask=key_ok[None, :],
                        other=0.0)
            v = tl.load(v_cache + kv_off[:, None] + dims[None, :], mask=key_ok[:, None],
                        other=0.0)
        else:
            k = tl.load(k_cache + kv_off[None, :] + dims[:, None])
            v = tl.load(v_cache + kv_off[:, None] + dims[None, :])
    return k, v


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, q_pos, t_start, t_end, ctx, window,
    k_cache, v_cache, k_desc, v_desc, table, kv_head, stride_kb, stride_ks, stride_kh,
    scale_log2, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr, CARRY: tl.constexpr,
):
    """Online softmax over key tiles [t_start, t_end); MASKED applies causal/window/length;
    LAZY defers rescaling on unmasked tiles (``_lazy_update``).

    CARRY looks up the next tile's pages one iteration ahead, so a tile's K/V addresses do
    not hang on a block-table load of the same iteration: with them, triton's pipeliner
    issued each tile's copies only after the previous tile's products and waited on them at
    once (no prefetch at any num_stages); carried, num_stages >= 3 keeps the next tile's
    copies in flight during this one's products."""
    key_end = tl.minimum(ctx, t_end * BLOCK_N)
    page = tile_pages(table, t_start * BLOCK_N, key_end, BLOCK_SIZE, BLOCK_N, TMA)
    for t in range(t_start, t_end):
        keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
        if not CARRY:
            page = tile_pages(table, t * BLOCK_N, key_end, BLOCK_SIZE, BLOCK_N, TMA)
        k, v = _load_kv(k_cache, v_cache, k_desc, v_desc, page, t, ctx, kv_head, stride_kb,
                        stride_ks, stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASKED, TMA)
        if CARRY:
            page = tile_pages(table, (t + 1) * BLOCK_N, key_end, BLOCK_SIZE, BLOCK_N, TMA)
        s = mma(q, k, None, UPCAST, PRECISION)
        if LAZY and not MASKED:
            acc, m_i, l_i = _lazy_update(acc, m_i, l_i, s, v, scale_log2, UPCAST, PRECISION)
        else:
            s *= scale_log2
            if MASKED:
                ok = (keys[None, :] <= q_pos[:, None]) & (keys < ctx)[None, :]
                if HAS_WINDOW:
                    ok = ok & (keys[None, :] > q_pos[:, None] - window)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
            if MASKED:  # a row that sees no key yet keeps max -inf; exponentiate against 0
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _lazy_update(acc, m_i, l_i, s, v, scale_log2, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One fully visible key tile of raw scores s, rescaling acc and l only when some row's
    maximum grew by more than RESCALE_LOG2: otherwise the stale maximum stays the reference, so
    p may reach 2^RESCALE_LOG2 (safe in fp32 sums and in bf16), and acc, l and m stay
    consistent, which is all the final division (or the split merge) needs. It saves the
    [rows, head_dim] multiply and the alpha exponentials on most tiles, CUDA-core work beside
    the MMAs; the score scale folds into the exponent's argument (one fused multiply-add)."""
    m_tile = tl.max(s, 1) * scale_log2  # scale_log2 > 0: the maximum of the scaled scores
    if tl.max(m_tile - m_i, 0) > RESCALE_LOG2:  # always on a row's first tile (m_i = -inf)
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(s * scale_log2 - m_i[:, None])
    l_i += tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc, UPCAST, PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_seqs", "n_rows"])
def _prefill_kernel(
    q_ptr, k_cache, v_cache, k_desc, v_desc, out_ptr, ws, query_starts, context_lens,
    block_tables,
    num_seqs, n_rows, scale_log2, window,
    stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, USE_PDL: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
    CARRY: tl.constexpr, REVERSE: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    tile = tl.program_id(0)
    if REVERSE:
        tile = tl.num_programs(0) - 1 - tile
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq = _find_sequence(query_starts, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_starts + seq).to(tl.int32)
    q_len = tl.load(query_starts + seq + 1).to(tl.int32) - q_start
    first_q = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_q >= q_len:
        return
    ctx = tl.load(context_lens + seq).to(tl.int32)
    pos0 = ctx - q_len  # absolute position of the sequence's first query

    rows = tl.arange(0, BLOCK_M)
    qi = first_q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (qi < q_len)
    q_pos = pos0 + qi
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)

    # key spans of this tile: visible to some row [kv_lo, kv_hi), to every row [full_lo, full_hi)
    p_first = pos0 + first_q
    p_last = pos0 + tl.minimum(first_q + BLOCK_Q, q_len) - 1
    kv_lo = 0
    full_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(p_first - window + 1, 0)
        full_lo = tl.maximum(p_last - window + 1, 0)
    t_lo = kv_lo // BLOCK_N
    t_hi = tl.cdiv(p_last + 1, BLOCK_N)
    f_lo = tl.cdiv(full_lo, BLOCK_N)
    f_hi = (p_first + 1) // BLOCK_N
    has_full = f_lo < f_hi
    f_lo = tl.where(has_full, f_lo, t_hi)
    f_hi = tl.where(has_full, f_hi, t_hi)

    per_split = tl.cdiv(t_hi - t_lo, num_splits)
    s_lo = t_lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, t_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, s_lo, tl.minimum(s_hi, f_lo), ctx, window,
        k_cache, v_cache, k_desc, v_desc, table, kv_head, stride_kb, stride_ks, stride_kh,
        scale_log2, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, HAS_WINDOW, UPCAST, PRECISION, TMA, LAZY,
        CARRY)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, tl.maximum(s_lo, f_lo), tl.minimum(s_hi, f_hi), ctx, window,
        k_cache, v_cache, k_desc, v_desc, table, kv_head, stride_kb, stride_ks, stride_kh,
        scale_log2, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, HAS_WINDOW, UPCAST, PRECISION, TMA, LAZY,
        CARRY)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, tl.maximum(s_lo, f_hi), s_hi, ctx, window,
        k_cache, v_cache, k_desc, v_desc, table, kv_head, stride_kb, stride_ks, stride_kh,
        scale_log2, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, HAS_WINDOW, UPCAST, PRECISION, TMA, LAZY,
        CARRY)

    num_heads = tl.num_programs(1) * GROUP
    if SPLIT:
        out_row, m_slot, l_slot = split_slots(ws, split, q_rows, heads, num_splits, n_rows,
                                              num_heads, HEAD_DIM)
        tl.store(out_row[:, None] + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(m_slot, m_i, mask=row_ok)
        tl.store(l_slot, l_i, mask=row_ok)
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_i[:, None]
        dst = out_ptr + (q_rows * num_heads + heads)[:, None] * HEAD_DIM + dims[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _tiles(head_dim: int, dtype: torch.dtype, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of an unsplit launch for this head size,
    dtype and row need (``_split_tiles``: a launch split over keys)."""
    block_m = max(16, min(MAX_ROWS, triton.next_power_of_2(rows)))
    if dtype == torch.float32:
        block_m = min(block_m, 64)
        return block_m, 32, 4, 2
    if head_dim > 128:
        return min(block_m, 64), 32, 8, 2
    # H200 sweeps: for long chunks 64x64 led 128x32 at 512 and 2048 queries over 8k and 32k
    # keys, by 7-31% (results/*-prefill-long-d61294e.json); with the pages carried, three
    # stages took 4096 queries over 8k keys from 1062 to 977 us (pipeline_sweep.py)
    if rows <= MAX_ROWS:
        return block_m, 64, 4, 2
    return 64, 64, 4, 3


def _split_tiles(head_dim: int, dtype: torch.dtype, rows: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM) of a launch split over keys:
    a few row tiles over a long context (a question, a pushed record).

    Every row tile reads the whole context, so a chunk of several tiles takes the widest.
    With the pages carried (``_attend_tiles``) three stages keep the next key tile in flight;
    a 128-row tile then wants 8 warps (4 spill) and 129 KiB of shared memory, one program
    per SM, so it splits half as far. H200, ``pipeline_sweep.py``: a 32-token question over
    19k / 32k keys 50.1 / 69.8 -> 41.9 / 60.9 us, a 51-token record over 32k 140 -> 102 us."""
    if dtype == torch.float32 or head_dim > 128:
        return (*_tiles(head_dim, dtype, min(rows, MAX_ROWS)), SPLIT_PROGRAMS_PER_SM)
    if rows <= 64:
        return max(16, triton.next_power_of_2(rows)), 64, 4, 3, SPLIT_PROGRAMS_PER_SM
    return MAX_ROWS, 64, 8, 3, 1


def _plan(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMeta) -> dict[str, int]:
    """Tile sizes, grid and split count, from host-side sizes only.

    A launch whose row tiles fill the GPU runs unsplit with ``_tiles``; one with too few (a
    short chunk over a long context) is split over keys with ``_split_tiles``. The split
    count is sized for the capture's context (``graphs.py`` captures at the largest), and
    each program derives its own key range on the device."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = meta.query_starts_list
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    context = max(meta.context_lens_list)

    def splits_for(block_q: int, per_sm: int) -> int:
        real_tiles = sum(triton.cdiv(n, block_q) for n in q_lens) * num_kv_heads
        return choose_splits(real_tiles, context, q.device, per_sm=per_sm)

    rows = max(q_lens) * group
    block_m, block_n, warps, stages = _tiles(head_dim, q.dtype, rows)
    per_sm = SPLIT_PROGRAMS_PER_SM
    if splits_for(block_m // group, per_sm) > 1:
        block_m, block_n, warps, stages, per_sm = _split_tiles(head_dim, q.dtype, rows)
    block_q = block_m // group
    return dict(group=group, block_m=block_m, block_n=block_n, block_q=block_q, warps=warps,
                stages=stages, splits=splits_for(block_q, per_sm),
                tiles=q.shape[0] // block_q + len(q_lens))


def _defers_rescale(block_m: int, use_tma: bool) -> bool:
    """Deferred rescaling (``_lazy_update``) only for TMA-loaded 128-row tiles, where it
    measured faster. H200, ``perf/prefill_sweep.py --ab-lazy``: 64 questions of 32 tokens
    over 4k keys 411 against 443 us; but a 32-token question over 19k / 34k keys (a split,
    pointer-loaded launch) 63.5 / 88.7 against 48.6 / 69.6 us, and a 4096-token chunk (64-row
    TMA tiles) over 8k / 32k keys 1078 / 5403 against 1017 / 4968 us."""
    return LAZY_RESCALE and use_tma and block_m == MAX_ROWS


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [N, Hq, D] over each sequence's paged context -> [N, Hq, D].

    num_splits overrides the key-split count chosen from the batch (tests, tuning).
    """
    return _attend(q, k_cache, v_cache, meta, scale, sliding_window, num_splits, use_tma=False)


def paged_prefill_attention_tma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``paged_prefill_attention`` loading each key tile as one TMA descriptor copy: needs
    ``tma.PAGE``-token pages (the KV block size), so that a page is exactly one tile.

    Only unsplit launches load by TMA: each program then walks the whole context (long data
    chunks, many questions at once), and there TMA took 13-16% off ingest at 21k and 34k
    and 5% off the 64-question step on an H200. A split launch (one short question over a
    long context, a few key tiles per program) loads by pointer: with TMA its step was
    slower (6.41 against 6.27 ms at 19k)."""
    tma.check_page(k_cache)
    return _attend(q, k_cache, v_cache, meta, scale, sliding_window, num_splits, use_tma=True)


def _attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
    scale: float, sliding_window: int | None, num_splits: int | None, use_tma: bool,
) -> torch.Tensor:
    n, num_heads, head_dim = q.shape
    check_caches(k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if n == 0:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    plan = _plan(q, k_cache, meta)
    splits = num_splits or plan["splits"]
    use_tma = use_tma and (splits == 1 or TMA_IN_SPLITS)
    if use_tma:
        plan["block_n"] = k_cache.shape[1]
    k_desc, v_desc = tma.kernel_args(k_cache, v_cache, use_tma)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    ws = split_workspace(splits, n, num_heads, head_dim, q.device) if splits > 1 else out
    _prefill_kernel[(plan["tiles"], k_cache.shape[2], splits)](
        q, k_cache, v_cache, k_desc, v_desc, out, ws, meta.query_starts, meta.context_lens,
        meta.block_tables, meta.num_seqs, n, scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=plan["group"], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_Q=plan["block_q"],
        SPLIT=splits > 1, HAS_WINDOW=sliding_window is not None, **dot_flags(q.dtype),
        num_warps=plan["warps"], num_stages=plan["stages"], TMA=use_tma,
        LAZY=_defers_rescale(plan["block_m"], use_tma), CARRY=CARRY_PAGES, REVERSE=LONGEST_FIRST,
        **pdl.launch_args(q.device),
    )
    if splits > 1:
        combine_splits(ws, splits, out)
    return out
