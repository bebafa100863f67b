"""Split-K paged decode attention (flash-decoding): one query token per sequence.

The split kernel runs one program per (sequence, kv head, split). It handles every query head
of the GQA group at once, so each K/V row is read from the cache exactly once. With one split
a program writes the normalised output directly (one launch, no workspace). With several, it
writes its split's unnormalised fp32 output and running max and sum to a workspace, and
``_combine_splits_kernel`` merges the splits in a second launch (prefill's splits are merged by
the same kernel).

Merging in the split kernel instead (the last split of each group to arrive, by an arrival
counter) measured slower on an H200 at Llama-3.1-8B shapes: 42 against 29 us per call for one
sequence at 19k keys in 64 splits. The combine kernel merges every query head on its own SM in
parallel, while the in-kernel merge puts one program's chain of dependent L2 reads and
reductions at the end of each group's critical path and raises the split kernel's registers.
The direct write for one split is a win (208 against 213 us for 64 sequences at 4k keys).

The split count only shapes the grid: each program reads its sequence's length from the device
and derives its own key range, so any fixed split count (a CUDA graph's) is correct for any
context length. Splits past the end of a short sequence write neutral stats (max -inf, sum 0);
a context of no keys gives zeros.

``paged_decode_attention_tma`` loads each key tile with one TMA descriptor copy (``tma.py``),
for KV blocks of exactly one tile; its splits then start on page boundaries, and keys before
a sliding window's start are masked like those past the context's end.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.triton_backend import pdl, tma
from livelm.daemon.kernels.triton_backend.pdl import wait_for_producer

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 64  # one key tile; more splits won at 2.6k context on an H200
PROGRAMS_PER_SM = 2  # one wave of deep-pipelined programs (``_tiles``)
CARRY_PAGES = True  # look up a key tile's pages one iteration ahead (``_attend_split``)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32 (acc None: a @ b); UPCAST works around the interpreter's bf16 dot.

    Accumulating into acc inside the dot, rather than adding a fresh product to it, keeps one
    [rows, head_dim] fp32 tile live instead of two, so a 128-row tile does not spill."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def split_slots(ws, split, row, head, num_splits, n_rows, num_heads, HEAD_DIM: tl.constexpr):
    """Where a split's partial output row, max and sum live in the fp32 workspace:
    [S, N, Hq, D] outputs, then [S, N, Hq] maxima, then [S, N, Hq] sums."""
    zero = tl.zeros([], tl.int64)  # int arguments equal to 1 arrive as constexprs
    cells = (zero + num_splits) * n_rows * num_heads
    cell = ((zero + split) * n_rows + row) * num_heads + head
    stats = ws + cells * HEAD_DIM + cell
    return ws + cell * HEAD_DIM, stats, stats + cells


@triton.jit
def tile_pages(table, k0, end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               TMA: tl.constexpr):
    """Where the key tile starting at key k0 lives, for loops over keys below ``end``: TMA,
    the first cache row of its page (a page is one tile); else each key's page number, zeros
    at or past end (so also for a loop's look ahead past its last tile, where TMA reads the
    last tile's entry). Both attention kernels' loops carry it one tile ahead."""
    if TMA:
        entry = tl.maximum(tl.minimum(k0, end - 1), 0) // BLOCK_SIZE
        page = tl.load(table + entry).to(tl.int32) * BLOCK_SIZE
    else:
        keys = k0 + tl.arange(0, BLOCK_N)
        page = tl.load(table + keys // BLOCK_SIZE, mask=keys < end, other=0).to(tl.int64)
    return page


@triton.jit
def _attend_split(q, k_cache, v_cache, k_desc, v_desc, table, first, start, end, kv_head,
                  scale_log2, stride_kb, stride_ks, stride_kh,
                  GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  TMA: tl.constexpr, CARRY: tl.constexpr):
    """Online softmax of the group's query rows over keys [max(start, first), end): (acc, max,
    sum). TMA: tiles are whole pages (start is page-aligned, so it may precede first), each
    loaded with one descriptor copy; else pointer loads through the block table. CARRY looks
    the next tile's pages up one iteration ahead, as the prefill kernel's loop does (there
    the reason is given)."""
    dims = tl.arange(0, HEAD_DIM)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    page = tile_pages(table, start, end, BLOCK_SIZE, BLOCK_N, TMA)
    for k0 in range(start, end, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        if not CARRY:
            page = tile_pages(table, k0, end, BLOCK_SIZE, BLOCK_N, TMA)
        if TMA:
            key_ok = (keys < end) & (keys >= first)
            # a page's slots outside the keys hold stale (even NaN) values: zero them
            k = tl.where(key_ok[None, :], tl.trans(k_desc.load([page, kv_head * HEAD_DIM])), 0.0)
            v = tl.where(key_ok[:, None], v_desc.load([page, kv_head * HEAD_DIM]), 0.0)
        else:
            key_ok = keys < end
            kv_off = page * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
            k = tl.load(k_cache + kv_off[None, :] + dims[:, None], mask=key_ok[None, :],
                        other=0.0)
        if CARRY:
            page = tile_pages(table, k0 + BLOCK_N, end, BLOCK_SIZE, BLOCK_N, TMA)
        s = mma(q, k, None, UPCAST, PRECISION) * scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if not TMA:
            v = tl.load(v_cache + kv_off[:, None] + dims[None, :], mask=key_ok[:, None],
                        other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_partials(acc, m_i, l_i, ws, seq, split, heads, row_ok, GROUP: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    """This split's unnormalised output, max and sum, to its workspace slots."""
    num_heads = tl.num_programs(1) * GROUP
    out_row, m_slot, l_slot = split_slots(ws, split, seq, heads, tl.num_programs(2),
                                          tl.num_programs(0), num_heads, HEAD_DIM)
    dims = tl.arange(0, HEAD_DIM)
    tl.store(out_row[:, None] + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(m_slot, m_i, mask=row_ok)
    tl.store(l_slot, l_i, mask=row_ok)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache, v_cache, k_desc, v_desc, out_ptr, ws, context_lens, block_tables,
    scale_log2, window,
    stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr, TMA: tl.constexpr, CARRY: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    ctx = tl.load(context_lens + seq).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    first = lo
    if TMA:  # whole pages: the splits start on page boundaries
        lo = lo // BLOCK_N * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, ctx)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qn + heads[:, None] * stride_qh
                + dims[None, :], mask=row_ok[:, None], other=0.0)
    table = block_tables + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend_split(q, k_cache, v_cache, k_desc, v_desc, table, first, start, end,
                                  kv_head, scale_log2, stride_kb, stride_ks, stride_kh,
                                  GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, UPCAST, PRECISION,
                                  TMA, CARRY)
    if SPLIT:
        _store_partials(acc, m_i, l_i, ws, seq, split, heads, row_ok, GROUP, HEAD_DIM)
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        dst = out_ptr + (seq.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * HEAD_DIM
        tl.store(dst[:, None] + dims[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits", "n_rows"])
def _combine_splits_kernel(
    ws, out_ptr, num_splits, n_rows, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[n, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (zero when no key counted)."""
    wait_for_producer(USE_PDL)
    n = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    ok = splits < num_splits
    out_row, m_slot, l_slot = split_slots(ws, splits, n, h, num_splits, n_rows, num_heads,
                                          HEAD_DIM)
    m = tl.load(m_slot, mask=ok, other=float("-inf"))
    l_s = tl.load(l_slot, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    acc = tl.load(out_row[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w * l_s, 0)
    total = tl.where(total == 0.0, 1.0, total)
    o = tl.sum(acc * w[:, None], 0) / total
    dst = out_ptr + (n.to(tl.int64) * num_heads + h) * HEAD_DIM + dims
    tl.store(dst, o.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def is_interpreted() -> bool:
    return not isinstance(_decode_split_kernel, triton.runtime.JITFunction)


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """fp32 inputs use exact fp32 products (not tf32) so they match the reference."""
    return {
        "UPCAST": is_interpreted() and dtype == torch.bfloat16,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def min_keys_per_split(device: torch.device) -> int:
    return MIN_KEYS_PER_SPLIT if device.type == "cuda" else 16  # tiny splits in the interpreter


def choose_splits(
    programs: int, max_context: int, device: torch.device, per_sm: int = PROGRAMS_PER_SM
) -> int:
    """Splits so that programs x splits fills the GPU in one wave, none shorter than the
    minimum. Rounding up would start a few programs in a second wave that doubles the
    launch: an H200's 32-token question with one 128-row program per SM took 79.7 us over
    32k keys in 17 splits (136 programs on 132 SMs), 60.9 in 16."""
    target = per_sm * sm_count(device)
    if 2 * programs > target:  # already half full: a split's merge costs more than it gains
        return 1
    want = target // max(programs, 1)
    by_length = triton.cdiv(max(max_context, 1), min_keys_per_split(device))
    return max(1, min(want, by_length, MAX_SPLITS))


def graph_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """A fixed split count for a captured decode graph: fills the GPU at any context length."""
    return choose_splits(num_seqs * num_kv_heads, MAX_SPLITS * MIN_KEYS_PER_SPLIT, device)


def _tiles(head_dim: int, dtype: torch.dtype, split: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). With the pages carried (``_attend_split``), deeper
    pipelines pay: H200, ``pipeline_sweep.py``, one sequence over 19k keys 27.2 -> 25.1 us
    (3 stages, 33 splits: one wave of programs at 70 KiB of shared memory each), 64 sequences
    over 4k keys, unsplit, 284 -> 251 us (4 stages)."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return (64, 4, 3) if split else (64, 4, 4)


def split_workspace(splits: int, rows: int, num_heads: int, head_dim: int,
                    device: torch.device) -> torch.Tensor:
    """One fp32 buffer for the partial outputs and stats of ``split_slots``."""
    return torch.empty(splits * rows * num_heads * (head_dim + 2), device=device,
                       dtype=torch.float32)


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with a unit last stride")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (one row per sequence) -> [B, Hq, D]; num_splits fixed for graph capture."""
    return _decode(q, k_cache, v_cache, meta, scale, sliding_window, num_splits, use_tma=False)


def paged_decode_attention_tma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``paged_decode_attention`` loading each key tile as one TMA descriptor copy: needs
    ``tma.PAGE``-token pages (the KV block size), so that a page is exactly one tile."""
    tma.check_page(k_cache)
    return _decode(q, k_cache, v_cache, meta, scale, sliding_window, num_splits, use_tma=True)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
    scale: float, sliding_window: int | None, num_splits: int | None, use_tma: bool,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    check_caches(k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_splits(num_seqs * num_kv_heads, max(meta.context_lens_list), q.device)
    ws = out  # a placeholder where unused
    if num_splits > 1:
        ws = split_workspace(num_splits, num_seqs, num_heads, head_dim, q.device)
    block_n, warps, stages = _tiles(head_dim, q.dtype, num_splits > 1)
    if use_tma:
        block_n = k_cache.shape[1]
    k_desc, v_desc = tma.kernel_args(k_cache, v_cache, use_tma)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_desc, v_desc, out, ws, meta.context_lens, meta.block_tables,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, SPLIT=num_splits > 1,
        HAS_WINDOW=sliding_window is not None, **dot_flags(q.dtype),
        num_warps=warps, num_stages=stages, TMA=use_tma, CARRY=CARRY_PAGES,
        **pdl.launch_args(q.device),
    )
    if num_splits > 1:
        combine_splits(ws, num_splits, out)
    return out


def combine_splits(ws: torch.Tensor, num_splits: int, out: torch.Tensor) -> None:
    """Merge the workspace's splits into out [N, Hq, D] (contiguous): the second kernel of a
    split prefill or decode."""
    n, num_heads, head_dim = out.shape
    _combine_splits_kernel[(n, num_heads)](
        ws, out, num_splits, n,
        HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        **pdl.launch_args(out.device),
    )
