"""Split-K paged decode attention (flash-decoding): one query token per sequence.

Kernel 1 runs one program per (sequence, kv head, split). It handles every query head of the
GQA group at once, so each K/V row is read from the cache exactly once, and writes the split's
unnormalised output with its running max and sum. Kernel 2 merges the splits.

The split count only shapes the grid: each program reads its sequence's length from the device
and derives its own key range, so any fixed split count (a CUDA graph's) is correct for any
context length. Splits past the end of a short sequence write neutral stats (max -inf, sum 0).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.attention_meta import AttentionMeta

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed costs outweigh its parallelism
PROGRAMS_PER_SM = 4  # memory-bound: several resident programs keep more loads in flight


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST works around the interpreter's bf16 dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache, v_cache, part_out, part_m, part_l,
    context_lens, block_tables,
    scale_log2, window,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ps, stride_pn, stride_ph,  # part_out [S, B, Hq, D]; part_m/part_l [S, B, Hq] share the first three
    stride_ms, stride_mn,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    ctx = tl.load(context_lens + seq).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    chunk = tl.maximum(tl.cdiv(ctx - lo, num_splits), MIN_CHUNK)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, ctx)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    for k0 in range(start, end, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        page = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slot = keys % BLOCK_SIZE
        k_off = page * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_off = page * stride_vb + slot * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache + k_off[None, :] + dims[:, None], mask=key_ok[None, :], other=0.0)
        s = mma(q, k, UPCAST, PRECISION) * scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + v_off[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new

    base = split * stride_ps + seq * stride_pn
    tl.store(part_out + base + heads[:, None] * stride_ph + dims[None, :], acc,
             mask=row_ok[:, None])
    stats = split * stride_ms + seq * stride_mn + heads
    tl.store(part_m + stats, m_i, mask=row_ok)
    tl.store(part_l + stats, l_i, mask=row_ok)


@triton.jit
def combine_splits_kernel(
    part_out, part_m, part_l, out_ptr, num_splits,
    stride_ps, stride_pn, stride_ph,
    stride_ms, stride_mn,
    stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """out[n, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (zero when no key counted)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    ok = splits < num_splits
    stats = splits * stride_ms + n * stride_mn + h
    m = tl.load(part_m + stats, mask=ok, other=float("-inf"))
    l_s = tl.load(part_l + stats, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    acc = tl.load(part_out + splits[:, None] * stride_ps + n * stride_pn + h * stride_ph
                  + dims[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w * l_s, 0)
    total = tl.where(total == 0.0, 1.0, total)
    o = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + n * stride_on + h * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


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


def choose_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough (sequence, head, split) programs to fill the GPU, none shorter than the minimum."""
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), num_seqs * num_kv_heads)
    by_length = triton.cdiv(max(max_context, 1), MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_length, MAX_SPLITS))


def _tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_warps)."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4
    return 64, 4


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
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_splits(num_seqs, num_kv_heads, max(meta.context_lens_list), q.device)
    part_out = torch.empty(num_splits, num_seqs, num_heads, head_dim, device=q.device,
                           dtype=torch.float32)
    part_m = torch.empty(num_splits, num_seqs, num_heads, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    block_n, warps = _tiles(head_dim, q.dtype)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_m, part_l,
        meta.context_lens, meta.block_tables,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_m.stride(0), part_m.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, MIN_CHUNK=min(MIN_KEYS_PER_SPLIT, 64),
        HAS_WINDOW=sliding_window is not None, **dot_flags(q.dtype),
        num_warps=warps, num_stages=3,
    )
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    combine_splits(part_out, part_m, part_l, out)
    return out


def combine_splits(
    part_out: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor
) -> None:
    """Merge [S, N, Hq, D] partial outputs and [S, N, Hq] stats into out [N, Hq, D]."""
    num_splits, n, num_heads, head_dim = part_out.shape
    combine_splits_kernel[(n, num_heads)](
        part_out, part_m, part_l, out, num_splits,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_m.stride(0), part_m.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
    )
