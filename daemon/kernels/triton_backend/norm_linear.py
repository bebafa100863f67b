"""The ``norm_linear`` operation: a layer's RMS norm (with its residual add) and the projection
it feeds, as the decoder calls them twice per layer (the input norm and QKV, the
post-attention norm and gate/up).

Two forms, both graph-safe: the norm kernel then ``linear`` (what the decoder ran before the
operation existed), and the norm fused into the skinny GEMM's x tiles for decode-sized
batches, which saves a launch and the normed rows' round trip per norm.
"""

from __future__ import annotations

import torch

from livelm.daemon.kernels.triton_backend import norms, skinny_gemm

MAX_NORM_FUSED_ROWS = 16  # decode batches; longer steps run the norm kernel then linear


def norm_then_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm kernel (with the residual add), then ``linear`` (the skinny GEMM up to 64 rows,
    cuBLAS beyond or with a bias)."""
    if residual is None:
        normed, summed = norms.rms_norm(x, norm_weight, eps), x
    else:
        normed, summed = norms.add_rms_norm(x, residual, norm_weight, eps)
    return skinny_gemm.linear(normed, weight, bias), summed


def fused_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm inside the skinny GEMM for up to ``MAX_NORM_FUSED_ROWS`` rows without a bias;
    ``norm_then_linear`` otherwise."""
    if bias is not None or x.dim() != 2 or x.shape[0] > MAX_NORM_FUSED_ROWS:
        return norm_then_linear(x, residual, norm_weight, weight, bias, eps)
    return skinny_gemm.norm_linear(x, residual, norm_weight, weight, eps)
