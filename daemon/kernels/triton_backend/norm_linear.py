"""Residual add + RMSNorm folded into the skinny GEMM that consumes the norm: for one row (a
decode step of one sequence), ``linear(norm(x + residual), weight)`` and ``x + residual`` in a
single launch.

A decode step runs two of these per layer (before the qkv and the gate/up projections). Alone,
each norm is a one-program kernel of about 2 µs on an H200, nearly all latency: waiting for
its producer, one L2 round trip, a block reduction, another launch. Folded in, every program
of the GEMM forms its x tiles as ``(x + residual) * norm_weight`` as it streams the weight,
and since the row's ``1 / rms`` is one scale per output row it is applied after the K loop;
each program loads the whole row once (8 KiB at hidden size 4096, from L2) before the loop to
compute it, and the grid's first program writes the residual sum out.

Rounding: the residual sum is rounded to the dtype as the unfused kernels round it, but the
product's input is ``(sum * weight)`` rounded once, scaled by ``1 / rms`` in fp32 afterwards,
where the unfused path rounds ``sum / rms`` and then its product with the weight: the two
differ by about one rounding of the dtype per element (none in fp32).

More than one row goes unfused (the norm kernel, then ``linear``): every program would have
to load all rows whole to scale them, which costs more than the norm's launch from a few rows
on; so does a bias, or a row wider than ``MAX_NORM_K`` (held in registers).
"""

from __future__ import annotations

import torch

from livelm.daemon.kernels.triton_backend import norms, skinny_gemm
from livelm.daemon.kernels.triton_backend.paged_decode import sm_count
from livelm.daemon.kernels.triton_backend.skinny_gemm import NormInput, SkinnyConfig

MAX_NORM_K = 8192  # one row of x and of the residual held in registers by every program
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Process-wide switch for A/B benchmarks: off, every call takes the unfused path."""
    global _enabled
    _enabled = enabled


def _check(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
           weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or residual.shape != x.shape:
        raise ValueError(f"x and residual must both be one row [1, K], got {tuple(x.shape)} "
                         f"and {tuple(residual.shape)}")
    k = x.shape[1]
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    if k > MAX_NORM_K:
        raise ValueError(f"rows wider than {MAX_NORM_K} are not fused, got K={k}")
    if residual.dtype != x.dtype or norm_weight.dtype != x.dtype:
        raise ValueError(f"x, residual and norm_weight must share one dtype, got {x.dtype}, "
                         f"{residual.dtype} and {norm_weight.dtype}")
    skinny_gemm._check_inputs(x, weight)


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, weight: torch.Tensor,
                        config: SkinnyConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(norm(x + residual)), x + residual)`` for one row x [1, K] and weight [N, K],
    in one launch. ``config`` defaults to ``skinny_gemm.default_config``."""
    _check(x, residual, norm_weight, weight)
    n, k = weight.shape
    if config is None:
        config = skinny_gemm.default_config(1, n, k, sm_count(x.device), x.element_size())
    x, residual, norm_weight = x.contiguous(), residual.contiguous(), norm_weight.contiguous()
    summed = torch.empty_like(x)
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    if n == 0 or k == 0:
        torch.add(residual, x, out=summed)
        return out.zero_(), summed
    norm = NormInput(residual, norm_weight, summed, float(eps))
    skinny_gemm._launch(x, weight, out, config, swiglu=False, norm=norm)
    return out, summed


def _fusable(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
             weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (_enabled and bias is None and x.dim() == 2 and x.shape[0] == 1 and residual.shape == x.shape
            and 0 < x.shape[1] <= MAX_NORM_K
            and x.dtype == residual.dtype == norm_weight.dtype == weight.dtype)


def add_rms_norm_linear_op(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dispatcher's ``add_rms_norm_linear``: fused for one row of one dtype without a bias
    (a decode step of one sequence), else the norm kernel then the skinny GEMM's ``linear``
    (cuBLAS beyond its row limit or with a bias)."""
    if _fusable(x, residual, norm_weight, weight, bias):
        return add_rms_norm_linear(x, residual, norm_weight, eps, weight)
    normed, summed = norms.add_rms_norm(x, residual, norm_weight, eps)
    return skinny_gemm.linear(normed, weight, bias), summed
