"""Fused RMSNorm and residual-add + RMSNorm over the last dim, one program per row.

Rounding follows the reference: the sum is rounded to its dtype, the norm is computed in fp32
and rounded to the input dtype, then multiplied by the weight in the promoted dtype. Inputs of
any leading shape are read through two leading strides, so q/k views [N, H, D] cut out of a
fused projection need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.triton_backend import pdl
from livelm.daemon.kernels.triton_backend.pdl import wait_for_producer


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    inner, dim, eps,
    sx0, sx1, sr0, sr1,
    BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    i0 = row // inner
    i1 = row % inner
    cols = tl.arange(0, BLOCK_D)
    ok = cols < dim
    x = tl.load(x_ptr + i0 * sx0 + i1 * sx1 + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + i0 * sr0 + i1 * sr1 + cols, mask=ok, other=0.0)
        summed = (r.to(tl.float32) + x.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * dim + cols, summed, mask=ok)
        h = summed.to(tl.float32)
    else:
        h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / dim + eps)
    if HAS_RESIDUAL:  # rounded to the dtype of the tensor being normed, as the reference does
        normed = h.to(sum_ptr.dtype.element_ty).to(tl.float32)
    else:
        normed = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = w.to(tl.float32) * normed
    tl.store(out_ptr + row * dim + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t as [A, B, D] with a unit last stride (a view when possible), and B."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, 1, -1), 1
    if t.dim() == 2:
        return t.unsqueeze(1), 1
    if t.dim() > 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t, t.shape[1]


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    summed: torch.Tensor | None,
) -> None:
    x3, inner = _rows(x)
    r3 = _rows(residual)[0] if residual is not None else x3
    rows, dim = x3.shape[0] * inner, x3.shape[2]
    if rows == 0:
        return
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows,)](
        x3, r3, weight, out, summed if summed is not None else out,
        inner, dim, eps,
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        BLOCK_D=block, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, block // 256)), **pdl.launch_args(x.device),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    _launch(x, None, weight.contiguous(), eps, out, None)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual)."""
    sum_dtype = torch.promote_types(residual.dtype, x.dtype)
    summed = torch.empty(x.shape, device=x.device, dtype=sum_dtype)
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, sum_dtype))
    _launch(x, residual, weight.contiguous(), eps, out, summed)
    return out, summed
