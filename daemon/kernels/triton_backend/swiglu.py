"""silu(gate) * up over gate_up [..., 2I], rounded like the reference (silu, then the product)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.triton_backend import pdl
from livelm.daemon.kernels.triton_backend.pdl import wait_for_producer

BLOCK = 1024


@triton.jit
def _swiglu_kernel(src, dst, inner, stride_row, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_producer(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inner
    gate = tl.load(src + row * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(src + row * stride_row + inner + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = dst.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(dst + row * inner + cols, (act * up).to(dtype), mask=ok)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    inner = gate_up.shape[-1] // 2
    x = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    x = x.reshape(-1, 2 * inner)
    out = torch.empty(*gate_up.shape[:-1], inner, device=x.device, dtype=x.dtype)
    if x.shape[0] == 0 or inner == 0:
        return out
    _swiglu_kernel[(x.shape[0], triton.cdiv(inner, BLOCK))](
        x, out, inner, x.stride(0), BLOCK=BLOCK, num_warps=4, **pdl.launch_args(x.device)
    )
    return out
