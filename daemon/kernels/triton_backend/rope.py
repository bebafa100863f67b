"""Rotate-half RoPE of q and k in one launch: one program per token, all its heads.

Rounding follows the reference: cos/sin are cast to q's dtype, each product is rounded to that
dtype, then their sum. q and k may be strided views (rows of a fused qkv projection); the
outputs are fresh contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src, dst, token, stride_n, stride_h, num_heads, cos, sin, cols, partner, first_half,
            BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    ok = (heads[:, None] < num_heads) & (cols[None, :] < HEAD_DIM)
    row = src + token * stride_n + heads[:, None] * stride_h
    x = tl.load(row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    rotated = tl.where(first_half[None, :], -x2, x2)
    dtype = dst.dtype.element_ty
    y = (x * cos[None, :]).to(dtype).to(tl.float32) + (rotated * sin[None, :]).to(dtype).to(
        tl.float32)
    out = dst + token * num_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + cols[None, :]
    tl.store(out, y.to(dtype), mask=ok)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out, k_out, positions, cos_sin,
    num_q_heads, num_k_heads,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_cp, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
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
    _rotate(q_ptr, q_out, token, stride_qn, stride_qh, num_q_heads, cos, sin, cols, partner,
            first_half, BLOCK_HQ, HEAD_DIM)
    _rotate(k_ptr, k_out, token, stride_kn, stride_kh, num_k_heads, cos, sin, cols, partner,
            first_half, BLOCK_HK, HEAD_DIM)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k [N, Hk, D] rotated by cos_sin[positions] ([max_pos, 2, D] float32)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    n, num_q_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k_out = torch.empty(k.shape, device=k.device, dtype=q.dtype)
    if n == 0:
        return q_out, k_out
    block_d = triton.next_power_of_2(head_dim)
    block_hq = triton.next_power_of_2(num_q_heads)
    _rope_kernel[(n,)](
        q, k, q_out, k_out, positions, cos_sin,
        num_q_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0), cos_sin.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_HQ=block_hq,
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        num_warps=max(1, min(8, block_hq * block_d // 1024)),
        # else LLVM narrows the fp32 math to bf16 and fuses a product into the add (an FMA),
        # skipping the rounding of that product that the reference does
        enable_fp_fusion=False,
    )
    return q_out, k_out
