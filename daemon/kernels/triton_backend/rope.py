"""Rotate-half RoPE of q and k in one launch: one program per token, all its heads; and the
same fused with the KV-cache write (rotated k and v stored at each token's slot).

Rounding follows the reference: cos/sin are cast to q's dtype, each product is rounded to that
dtype, then their sum. q and k may be strided views (rows of a fused qkv projection); the
outputs are fresh contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.triton_backend import pdl
from livelm.daemon.kernels.triton_backend.pdl import wait_for_producer


@triton.jit
def _rotate(src, dst, token, dst_row, stride_n, stride_h, num_heads, cos, sin, cols, partner,
            first_half, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    ok = (heads[:, None] < num_heads) & (cols[None, :] < HEAD_DIM)
    row = src + token * stride_n + heads[:, None] * stride_h
    x = tl.load(row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    rotated = tl.where(first_half[None, :], -x2, x2)
    dtype = dst.dtype.element_ty
    y = (x * cos[None, :]).to(dtype).to(tl.float32) + (rotated * sin[None, :]).to(dtype).to(
        tl.float32)
    out = dst + dst_row * num_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + cols[None, :]
    tl.store(out, y.to(dtype), mask=ok)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, q_out, k_out, v_out, positions, cos_sin, slot_mapping,
    num_q_heads, num_k_heads,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cp, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, STORE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + token).to(tl.int64)
    half = HEAD_DIM // 2
    cols = tl.arange(0, BLOCK_D)
    first_half = cols < half
    partner = tl.where(first_half, cols + half, cols - half)
    col_ok = cols < HEAD_DIM
    table = cos_sin + pos * stride_cp
    dtype = q_out.dtype.element_ty
    cos = tl.load(table + cols, mask=col_ok, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(table + stride_cs + cols, mask=col_ok, other=0.0).to(dtype).to(tl.float32)
    _rotate(q_ptr, q_out, token, token, stride_qn, stride_qh, num_q_heads, cos, sin, cols,
            partner, first_half, BLOCK_HQ, HEAD_DIM)
    if STORE:  # k goes to its cache slot, v is copied there as it is
        slot = tl.load(slot_mapping + token).to(tl.int64)
        _rotate(k_ptr, k_out, token, slot, stride_kn, stride_kh, num_k_heads, cos, sin, cols,
                partner, first_half, BLOCK_HK, HEAD_DIM)
        heads = tl.arange(0, BLOCK_HK)
        ok = (heads[:, None] < num_k_heads) & col_ok[None, :]
        v = tl.load(v_ptr + token * stride_vn + heads[:, None] * stride_vh + cols[None, :],
                    mask=ok, other=0.0)
        dst = v_out + slot * num_k_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + cols[None, :]
        tl.store(dst, v.to(v_out.dtype.element_ty), mask=ok)
    else:
        _rotate(k_ptr, k_out, token, token, stride_kn, stride_kh, num_k_heads, cos, sin, cols,
                partner, first_half, BLOCK_HK, HEAD_DIM)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k [N, Hk, D] rotated by cos_sin[positions] ([max_pos, 2, D] float32)."""
    q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k_out = torch.empty(k.shape, device=k.device, dtype=q.dtype)
    _launch(q, k, k, positions, cos_sin, q_out, k_out, k_out, None)
    return q_out, k_out


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotated q; rotated k and v written to the caches ([blocks, block_size, Hk, D],
    contiguous) at slot_mapping."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_store_kv needs contiguous KV caches")
    q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _launch(q, k, v, positions, cos_sin, q_out, k_cache, v_cache, slot_mapping)
    return q_out


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    slot_mapping: torch.Tensor | None,
) -> None:
    q, k, v, cos_sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos_sin))
    n, num_q_heads, head_dim = q.shape
    if n == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_hq = triton.next_power_of_2(num_q_heads)
    _rope_kernel[(n,)](
        q, k, v, q_out, k_out, v_out, positions, cos_sin,
        positions if slot_mapping is None else slot_mapping,
        num_q_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), cos_sin.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_HQ=block_hq,
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), STORE=slot_mapping is not None,
        num_warps=max(1, min(8, block_hq * block_d // 1024)),
        # else LLVM narrows the fp32 math to bf16 and fuses a product into the add (an FMA),
        # skipping the rounding of that product that the reference does
        enable_fp_fusion=False, **pdl.launch_args(q.device),
    )
