"""Paged attention through FlexAttention: the batch's K/V are packed and masked per sequence.

Each step gathers every sequence's context into one packed K/V, and a mask function keeps a
query to the keys of its own sequence, at or before its position (and inside the sliding
window). On CUDA the kernel is compiled once with dynamic shapes; on the CPU it runs eagerly,
which is correct but slow (it materializes the scores).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.candidates import BackendUnavailable, Candidate, Target

NAME = "flex.paged"


def candidates() -> list[Candidate]:
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError as exc:
        raise BackendUnavailable(f"torch.nn.attention.flex_attention does not import: {exc}") from exc
    # eager use on the CPU is deliberate here; the warning says what we already know
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    fn = _make(flex.flex_attention, flex.create_block_mask)
    return [
        Candidate("prefill_attention", "flex", NAME, fn, _supports, False),
        Candidate("decode_attention", "flex", NAME, fn, _supports, False),
    ]


def _supports(target: Target) -> str | None:
    if target.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"no {target.dtype} support"
    if target.device.type not in ("cpu", "cuda"):
        return f"runs on cpu and cuda, not {target.device.type}"
    if target.head_dim < 16 or target.head_dim & (target.head_dim - 1):
        return f"head_dim {target.head_dim} is not a power of two >= 16"
    return None


def _make(flex_attention: Callable, create_block_mask: Callable) -> Callable:
    compiled: dict[str, Callable] = {}

    def kernel_for(device: torch.device) -> Callable:
        if device.type != "cuda":
            return flex_attention
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(flex_attention, dynamic=True)
        return compiled["fn"]

    def flex_paged(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        k, v, q_doc, q_pos, kv_doc, kv_pos = _pack(q, k_cache, v_cache, meta)
        mask_mod = _mask_mod(q_doc, q_pos, kv_doc, kv_pos, sliding_window)
        on_cuda = q.device.type == "cuda"
        mask = create_block_mask(
            mask_mod, None, None, q.shape[0], k.shape[0], device=q.device, _compile=on_cuda
        )
        out = kernel_for(q.device)(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            block_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)

    return flex_paged


def _pack(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta
) -> tuple[torch.Tensor, ...]:
    """Packed K/V [S, Hk, D] of all sequences, and each query's and key's sequence and position.

    Built from the device-side metadata with the sizes from the host lists: no device sync.
    """
    device, block_size = q.device, k_cache.shape[1]
    seqs = torch.arange(meta.num_seqs, device=device)
    ctx = meta.context_lens.long()
    q_lens = (meta.query_starts[1:] - meta.query_starts[:-1]).long()
    total = sum(meta.context_lens_list)
    q_doc = seqs.repeat_interleave(q_lens, output_size=q.shape[0])
    kv_doc = seqs.repeat_interleave(ctx, output_size=total)
    kv_starts = torch.cumsum(ctx, 0) - ctx
    kv_pos = torch.arange(total, device=device) - kv_starts[kv_doc]
    rows = torch.arange(q.shape[0], device=device)
    q_pos = rows - meta.query_starts.long()[q_doc] + (ctx - q_lens)[q_doc]
    blocks = meta.block_tables.long()[kv_doc, kv_pos // block_size]
    slots = blocks * block_size + kv_pos % block_size
    hk, d = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, hk, d)[slots]
    v = v_cache.view(-1, hk, d)[slots]
    return k, v, q_doc, q_pos, kv_doc, kv_pos


def _mask_mod(
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    kv_doc: torch.Tensor,
    kv_pos: torch.Tensor,
    window: int | None,
) -> Callable:
    def causal(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return (q_doc[qi] == kv_doc[ki]) & (kv_pos[ki] <= q_pos[qi])

    if window is None:
        return causal

    def windowed(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return causal(b, h, qi, ki) & (kv_pos[ki] > q_pos[qi] - window)

    return windowed
