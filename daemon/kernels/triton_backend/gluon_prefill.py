"""Paged prefill attention for Hopper (sm_90), written in Gluon with explicit asynchronous
warpgroup MMAs.

Same contract as ``paged_prefill``: a varlen batch of query chunks over the paged KV cache,
rows packing BLOCK_Q queries times the GQA group of one kv head, causal, split over keys when
the batch has too few row tiles to fill the GPU (merged by ``combine_splits``).

Why a second kernel: in the Triton one, every key tile's score product is waited on before its
softmax, and the softmax before the value product, so the tensor cores idle while the CUDA
cores exponentiate (Triton 3.6 emits every ``warp_group_dot_wait`` at depth 0). Here each
iteration issues tile i+1's scores and tile i's value product back to back, waits for the
scores only, and computes tile i+1's softmax while the value product runs: the ordering
FlashAttention-3 calls intra-warpgroup overlap. Key tiles arrive by TMA (one 64-token page of
one kv head per copy) into a ring of STAGES slots, each with its own barrier for K and for V.

Limits (``unsupported_reason``): bf16/fp16, head size 64 or 128, 64-token KV pages, no sliding
window, a GQA group dividing BLOCK_M. Launched with programmatic dependent launch where the
Triton kernels are (``pdl.py``'s rules: wait for the producer before the first load or store).
"""

from __future__ import annotations

import weakref

import torch
import triton

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.triton_backend import paged_prefill, pdl
from livelm.daemon.kernels.triton_backend.paged_decode import (
    LOG2E,
    check_caches,
    choose_splits,
    combine_splits,
    split_workspace,
)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as exc:  # an older triton: this kernel is unavailable, the others are not
    gluon = None
    _IMPORT_ERROR: str | None = f"this triton has no Gluon for Hopper ({exc})"
else:
    _IMPORT_ERROR = None
    # names that changed after triton 3.6 (the GPU image's); CI's CPU machine compiles with newer
    cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

PAGE = 64  # tokens per KV block: one key tile per TMA copy
# 64 rows (one warpgroup), 3 key tiles in flight (48 KiB of K and V beside 16 KiB of Q), two
# programs an SM: the fastest of the A/B at every bench shape but 64 questions over 4k keys
# (H100, gluon_ab.py: a 32-token question over 19k keys 41.0 us a layer against 43.8 for the
# Triton kernel and 42.5 for 128 rows in 8 warps with 4 stages; a 4096-token chunk over 8k
# keys 880.9 against 937.6 and 968.8)
STAGES = 3
BLOCK_M = 64
WARPS = 4
SPLIT_PROGRAMS_PER_SM = 2


def unsupported_reason(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int,
                       page: int, sliding_window: int | None) -> str | None:
    """Why this kernel cannot serve these shapes (None: it can)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16, got {dtype}"
    if head_dim not in (64, 128):
        return f"needs head size 64 or 128, got {head_dim}"
    if page != PAGE:
        return f"needs {PAGE}-token KV blocks, got {page}"
    if sliding_window is not None:
        return "no sliding window"
    group = num_heads // num_kv_heads
    if BLOCK_M % group:
        return f"a GQA group of {group} does not divide {BLOCK_M} rows"
    return None


if gluon is not None:

    @gluon.jit
    def _wait_for_producer(USE_PDL: gl.constexpr):
        """``pdl.wait_for_producer`` in Gluon: wait for the previous kernel, then let the next
        one start."""
        if USE_PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _find_sequence(query_starts, num_seqs, tile, BLOCK_Q: gl.constexpr):
        """The last sequence b whose first virtual tile (query_starts[b] // BLOCK_Q + b) <= tile
        (the Triton kernel's rule: tiles of different sequences never overlap)."""
        lo = num_seqs * 0
        hi = num_seqs + 0
        while lo < hi - 1:
            mid = (lo + hi) // 2
            first = gl.load(query_starts + mid).to(gl.int32) // BLOCK_Q + mid
            lo = gl.where(first <= tile, mid, lo)
            hi = gl.where(first <= tile, hi, mid)
        return lo

    @gluon.jit
    def _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, table, t, last, slot,
                    kv_head, pred, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
        """Start the TMA copies of key tile t (its page's rows of one kv head) into a slot."""
        entry = gl.maximum(gl.minimum(t, last), 0)
        row = gl.load(table + entry).to(gl.int32) * BLOCK_N
        col = kv_head * HEAD_DIM
        k_bar = k_bars.index(slot)
        v_bar = v_bars.index(slot)
        mbarrier.expect(k_bar, k_desc.block_type.nbytes, pred)
        tma_load(k_desc, [row, col], k_bar, k_smem.index(slot), pred)
        mbarrier.expect(v_bar, v_desc.block_type.nbytes, pred)
        tma_load(v_desc, [row, col], v_bar, v_smem.index(slot), pred)

    @gluon.jit
    def _zero_stale_values(v_tile, t, ctx, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                           num_warps: gl.constexpr):
        """Zero a page's value rows at or past the context's end: they hold stale (even NaN)
        values, and a zero probability times NaN is NaN inside the product."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        v = v_tile.load(layout)
        keys = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        v = gl.where((keys < ctx)[:, None], v, gl.zeros_like(v))
        v_tile.store(v)
        fence_async_shared()
        cta_barrier()

    @gluon.jit
    def _softmax(s, m_i, l_i, t, f_hi, ctx, q_pos, scale_log2, dtype: gl.constexpr,
                 BLOCK_N: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
        """Online softmax of key tile t's raw scores: its probabilities as the value product's
        register operand, the rescale factor for the output so far, and the new max and sum."""
        qk = s * scale_log2
        if t >= f_hi:  # a tile on the causal diagonal, or past the context's end
            keys = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            ok = (keys[None, :] <= q_pos[:, None]) & (keys < ctx)[None, :]
            qk = gl.where(ok, qk, gl.full_like(qk, float("-inf")))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        m_ref = gl.where(m_new == float("-inf"), gl.zeros_like(m_new), m_new)
        p = gl.exp2(qk - m_ref[:, None])
        alpha = gl.exp2(m_i - m_ref)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        return p_op, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), m_new, l_i

    @gluon.jit
    def _values_ready(v_smem, v_bars, i, t, ctx, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                      HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        """Wait for tile i's values; zero its rows past the context's end."""
        slot = i % STAGES
        mbarrier.wait(v_bars.index(slot), (i // STAGES) & 1)
        if (t + 1) * BLOCK_N > ctx:
            _zero_stale_values(v_smem.index(slot), t, ctx, BLOCK_N, HEAD_DIM, num_warps)
        return v_smem.index(slot)

    @gluon.jit
    def _step(p_op, o, m_i, l_i, i, s_lo, n_tiles, f_hi, ctx, q_pos, scale_log2, s_zero,
              q_smem, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, table, t_last, kv_head,
              STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, num_warps: gl.constexpr):
        """Tile i's probabilities p_op are ready: issue tile i+1's scores, then tile i's value
        product; softmax tile i+1 while the value product runs. Nothing stays in flight past
        the iteration: ptxas serialises every warpgroup MMA of a kernel where registers of
        one in flight are touched (an accumulator carried across the loop's back-edge)."""
        nxt = i + 1
        mbarrier.wait(k_bars.index(nxt % STAGES), (nxt // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
        v_tile = _values_ready(v_smem, v_bars, i, s_lo + i, ctx, STAGES, BLOCK_N, HEAD_DIM,
                               num_warps)
        o_tok = warpgroup_mma(p_op, v_tile, o, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        p_next, alpha, m_i, l_i = _softmax(s, m_i, l_i, s_lo + nxt, f_hi, ctx, q_pos,
                                           scale_log2, v_desc.dtype, BLOCK_N, s_layout,
                                           o_layout)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
        o = o * alpha[:, None]
        # both warpgroups are done with tile i: refill its slot
        cta_barrier()
        _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, table, s_lo + i + STAGES,
                    t_last, i % STAGES, kv_head, i + STAGES < n_tiles, HEAD_DIM, BLOCK_N)
        return p_next, o, m_i, l_i

    @gluon.jit(do_not_specialize=["num_seqs", "n_rows"])
    def _prefill_kernel(
        q_ptr, k_desc, v_desc, out_ptr, ws, query_starts, context_lens, block_tables,
        num_seqs, n_rows, scale_log2, stride_qn, stride_qh, stride_bt,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_Q: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
        REVERSE: gl.constexpr, USE_PDL: gl.constexpr, num_warps: gl.constexpr,
    ):
        _wait_for_producer(USE_PDL)
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        gl.static_assert(STAGES >= 2, "the ring needs the next tile in flight: 2+ stages")
        tile = gl.program_id(0)
        if REVERSE:
            tile = gl.num_programs(0) - 1 - tile
        kv_head = gl.program_id(1)
        split = gl.program_id(2)
        num_splits = gl.num_programs(2)

        seq = _find_sequence(query_starts, num_seqs, tile, BLOCK_Q)
        q_start = gl.load(query_starts + seq).to(gl.int32)
        q_len = gl.load(query_starts + seq + 1).to(gl.int32) - q_start
        first_q = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
        if first_q < q_len:
            ctx = gl.load(context_lens + seq).to(gl.int32)
            pos0 = ctx - q_len
            p_first = pos0 + first_q
            p_last = pos0 + gl.minimum(first_q + BLOCK_Q, q_len) - 1
            t_hi = gl.cdiv(p_last + 1, BLOCK_N)
            f_hi = (p_first + 1) // BLOCK_N  # tiles below it are visible to every row
            per_split = gl.cdiv(t_hi, num_splits)
            s_lo = split * per_split
            n_tiles = gl.minimum(s_lo + per_split, t_hi) - s_lo
            table = block_tables + seq.to(gl.int64) * stride_bt

            s_layout: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
            o_layout: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
            q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
            q_smem_layout: gl.constexpr = gl.NVMMASharedLayout(
                swizzle_byte_width=128 if HEAD_DIM * 2 >= 128 else HEAD_DIM * 2,
                element_bitwidth=16, rank=2)

            rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
            dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
            qi = first_q + rows // GROUP
            heads = kv_head * GROUP + rows % GROUP
            q_rows = (q_start + qi).to(gl.int64)
            q = gl.load(q_ptr + q_rows[:, None] * stride_qn + heads[:, None] * stride_qh
                        + dims[None, :], mask=(qi < q_len)[:, None], other=0.0)
            q_smem = gl.allocate_shared_memory(q.dtype, [BLOCK_M, HEAD_DIM], q_smem_layout, q)

            dtype: gl.constexpr = k_desc.dtype
            k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
            k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for s in gl.static_range(STAGES):
                mbarrier.init(k_bars.index(s), count=1)
                mbarrier.init(v_bars.index(s), count=1)
            fence_async_shared()
            cta_barrier()

            t_last = s_lo + n_tiles - 1
            for s in gl.static_range(STAGES):
                _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, table, s_lo + s,
                            t_last, s, kv_head, s < n_tiles, HEAD_DIM, BLOCK_N)

            q_pos = pos0 + first_q + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout)) // GROUP
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
            o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
            s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
            mbarrier.wait(k_bars.index(0), 0, pred=n_tiles > 0)
            s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            s_first = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
            p_op, alpha, m_i, l_i = _softmax(s_first, m_i, l_i, s_lo, f_hi, ctx, q_pos,
                                             scale_log2, dtype, BLOCK_N, s_layout, o_layout)
            for i in range(0, n_tiles - 1):
                p_op, o, m_i, l_i = _step(
                    p_op, o, m_i, l_i, i, s_lo, n_tiles, f_hi, ctx, q_pos, scale_log2, s_zero,
                    q_smem, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, table, t_last,
                    kv_head, STAGES, HEAD_DIM, BLOCK_N, s_layout, o_layout, num_warps)
            if n_tiles > 0:
                last = n_tiles - 1
                v_tile = _values_ready(v_smem, v_bars, last, s_lo + last, ctx, STAGES, BLOCK_N,
                                       HEAD_DIM, num_warps)
                o_tok = warpgroup_mma(p_op, v_tile, o, is_async=True)
                o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
            for s in gl.static_range(STAGES):
                mbarrier.invalidate(k_bars.index(s))
                mbarrier.invalidate(v_bars.index(s))

            o_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
            o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            o_qi = first_q + o_rows // GROUP
            o_heads = kv_head * GROUP + o_rows % GROUP
            o_ok = (o_qi < q_len)[:, None]
            o_q = (q_start + o_qi).to(gl.int64)
            num_heads = gl.num_programs(1) * GROUP
            if SPLIT:
                cells = num_splits.to(gl.int64) * n_rows * num_heads
                cell = (split.to(gl.int64) * n_rows + o_q) * num_heads + o_heads
                gl.store(ws + cell[:, None] * HEAD_DIM + o_dims[None, :], o, mask=o_ok)
                stat_ok = o_qi < q_len
                m_out = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
                l_out = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
                gl.store(ws + cells * HEAD_DIM + cell, m_out, mask=stat_ok)
                gl.store(ws + cells * HEAD_DIM + cells + cell, l_out, mask=stat_ok)
            else:
                l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
                l_o = gl.where(l_o == 0.0, gl.full_like(l_o, 1.0), l_o)
                o = o / l_o[:, None]
                dst = out_ptr + (o_q * num_heads + o_heads)[:, None] * HEAD_DIM + o_dims[None, :]
                gl.store(dst, o.to(out_ptr.dtype.element_ty), mask=o_ok)


def smem_layout(head_dim: int, dtype: torch.dtype) -> object:
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([PAGE, head_dim], gl_dtype)


# By id of the layer's K view (a KV pool's views live as long as the pool). Each entry ends
# with its view, so a stopped engine's pool is freed rather than pinned by its descriptors.
_DESCRIPTORS: dict[int, tuple[weakref.ref, tuple[object, object]]] = {}


def _descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[object, object]:
    """K and V seen as [blocks * PAGE, kv_heads * head_dim], one page of one kv head per box.
    Kept per cache view (caches never move), so a call pays no descriptor set-up."""
    entry = _DESCRIPTORS.get(id(k_cache))
    if entry is not None and entry[0]() is k_cache:
        return entry[1]
    blocks, page, kv_heads, head_dim = k_cache.shape
    flat = [blocks * page, kv_heads * head_dim]
    layout = smem_layout(head_dim, k_cache.dtype)
    found = tuple(
        TensorDescriptor(c.view(flat), flat, [kv_heads * head_dim, 1], [page, head_dim], layout)
        for c in (k_cache, v_cache)
    )
    key = id(k_cache)
    _DESCRIPTORS[key] = (weakref.ref(k_cache), found)
    weakref.finalize(k_cache, _DESCRIPTORS.pop, key, None)
    return found


def plan(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMeta) -> dict[str, int]:
    """Grid and split count from host-side sizes, as ``paged_prefill._plan`` does."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_q = BLOCK_M // group
    starts = meta.query_starts_list
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    real_tiles = sum(triton.cdiv(n, block_q) for n in q_lens) * num_kv_heads
    splits = choose_splits(real_tiles, max(meta.context_lens_list), q.device,
                           per_sm=SPLIT_PROGRAMS_PER_SM)
    return dict(group=group, block_q=block_q, splits=splits,
                tiles=q.shape[0] // block_q + len(q_lens))


def paged_prefill_attention_gluon(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [N, Hq, D] over each sequence's paged context -> [N, Hq, D] (``paged_prefill``'s
    contract); raises ValueError for shapes ``unsupported_reason`` refuses."""
    return _attend(q, k_cache, v_cache, meta, scale, sliding_window, num_splits, None)


def _attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
    scale: float, sliding_window: int | None, num_splits: int | None,
    p: dict[str, int] | None,
) -> torch.Tensor:
    """The launch, with ``plan``'s result when the caller has it already."""
    n, num_heads, head_dim = q.shape
    why = unsupported_reason(q.dtype, head_dim, num_heads, k_cache.shape[2], k_cache.shape[1],
                             sliding_window)
    if why is not None:
        raise ValueError(f"gluon prefill attention: {why}")
    check_caches(k_cache, v_cache)
    if not k_cache.is_contiguous():
        raise ValueError("gluon prefill attention needs contiguous KV caches")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if n == 0:
        return out
    p = p or plan(q, k_cache, meta)
    splits = num_splits or p["splits"]
    k_desc, v_desc = _descriptors(k_cache, v_cache)
    ws = split_workspace(splits, n, num_heads, head_dim, q.device) if splits > 1 else out
    _prefill_kernel[(p["tiles"], k_cache.shape[2], splits)](
        q, k_desc, v_desc, out, ws, meta.query_starts, meta.context_lens, meta.block_tables,
        meta.num_seqs, n, scale * LOG2E, q.stride(0), q.stride(1), meta.block_tables.stride(0),
        GROUP=p["group"], HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_Q=p["block_q"],
        SPLIT=splits > 1, STAGES=STAGES, REVERSE=True, num_warps=WARPS,
        **pdl.launch_args(q.device),
    )
    if splits > 1:
        combine_splits(ws, splits, out)
    return out


def paged_prefill_attention_gluon_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """This kernel where its launch splits over keys (a question or a record over a long
    context: bound by the KV read, where the overlap matters), the Triton TMA kernel for the
    rest (long chunks, whose 64-row tiles keep several programs per SM). The choice comes from
    host-side sizes only, so a captured graph keeps it."""
    p = plan(q, k_cache, meta)
    if (num_splits or p["splits"]) > 1:
        return _attend(q, k_cache, v_cache, meta, scale, sliding_window, num_splits, p)
    return paged_prefill.paged_prefill_attention_tma(q, k_cache, v_cache, meta, scale,
                                                     sliding_window, num_splits)
