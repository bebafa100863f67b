"""The torch backends: the reference kernels, paged attention through torch's SDPA, and a
batched sampler.

``torch_ref`` offers the reference functions themselves (always available, every device).
``torch_sdpa.paged`` gathers each sequence's K/V from the paged cache and calls
``F.scaled_dot_product_attention``; ``sdpa_attention(allowed)`` makes a copy pinned to a list of
SDPA backends, so the dispatcher can keep only the backends that passed its check.
``torch_batched.sample`` samples every row at once on the device (``batched_sampling``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from livelm.daemon.kernels import batched_sampling, torch_ref
from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.candidates import Candidate, Target
from livelm.daemon.kernels.ops import PagedAttention

SDPA_NAME = "torch_sdpa.paged"

# the SDPA backends worth probing one by one on CUDA, by the name the table shows
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _probe_enable_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (2.5 and later)."""
    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


HAS_ENABLE_GQA = _probe_enable_gqa()


def _any_target(_: Target) -> str | None:
    return None


def _float_only(target: Target) -> str | None:
    if not target.dtype.is_floating_point:
        return f"needs a floating-point dtype, not {target.dtype}"
    return None


def candidates() -> list[Candidate]:
    return _reference_candidates() + _sdpa_candidates() + _batched_candidates()


def _batched_candidates() -> list[Candidate]:
    # the settings stay on the device, but seeded rows draw noise per row: not captured
    return [
        Candidate(
            "sample", "torch_batched", "torch_batched.sample", batched_sampling.sample,
            _any_target, False,
        )
    ]


def _reference_candidates() -> list[Candidate]:
    def ref(op: str, fn: Callable, name: str, graph_safe: bool) -> Candidate:
        return Candidate(op, "torch_ref", f"torch_ref.{name}", fn, _any_target, graph_safe)

    # paged_attention, sample and copy_kv_blocks read host-side lists (or sync), so graphs
    # cannot capture them
    return [
        ref("rms_norm", torch_ref.rms_norm, "rms_norm", True),
        ref("add_rms_norm", torch_ref.add_rms_norm, "add_rms_norm", True),
        ref("rope", torch_ref.rope, "rope", True),
        ref("rope_store_kv", torch_ref.rope_store_kv, "rope_store_kv", True),
        ref("swiglu", torch_ref.swiglu, "swiglu", True),
        ref("linear", F.linear, "linear", True),
        ref("swiglu_linear", torch_ref.swiglu_linear, "swiglu_linear", True),
        ref("prefill_attention", torch_ref.paged_attention, "paged_attention", False),
        ref("decode_attention", torch_ref.paged_attention, "paged_attention", False),
        ref("sample", torch_ref.sample, "sample", False),
        ref("copy_kv_blocks", torch_ref.copy_kv_blocks, "copy_kv_blocks", False),
    ]


def _sdpa_candidates() -> list[Candidate]:
    fn = sdpa_attention(None)
    # decode batches read only device tensors; prefill loops over the host-side lengths
    return [
        Candidate("prefill_attention", "torch_sdpa", SDPA_NAME, fn, _float_only, False),
        Candidate("decode_attention", "torch_sdpa", SDPA_NAME, fn, _float_only, True),
    ]


def sdpa_attention(allowed: Sequence[SDPBackend] | None) -> PagedAttention:
    """Paged attention through SDPA, restricted to ``allowed`` backends (None: torch's choice)."""
    if allowed is None:
        return _sdpa_paged
    backends = list(allowed)

    def pinned(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        with sdpa_kernel(backends):
            return _sdpa_paged(q, k_cache, v_cache, meta, scale, sliding_window)

    return pinned


def _sdpa_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    if meta.decode_only:
        return _decode(q, k_cache, v_cache, meta, scale, sliding_window)
    out = torch.empty_like(q)
    starts = meta.query_starts_list
    for b, ctx in enumerate(meta.context_lens_list):
        lo, hi = starts[b], starts[b + 1]
        k = gather(k_cache, meta.block_tables[b], ctx)
        v = gather(v_cache, meta.block_tables[b], ctx)
        seq_out = _sequence(q[lo:hi], k, v, scale, sliding_window)
        out[lo:hi] = seq_out[0].transpose(0, 1)
    return out


def gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence's K or V: [length, Hk, D]."""
    block_size = cache.shape[1]
    blocks = table[: (length + block_size - 1) // block_size]
    return cache[blocks.long()].flatten(0, 1)[:length]


def _sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """One sequence: q [Lq, Hq, D] are the last Lq of the ctx positions of k, v [ctx, Hk, D]."""
    lq, ctx = q.shape[0], k.shape[0]
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if window is not None and ctx > window:
        return _masked(q4, k4, v4, scale, _window_mask(lq, ctx, window, q.device))
    if lq == 1:
        return _gqa(q4, k4, v4, scale, None, False)
    if lq == ctx:
        return _gqa(q4, k4, v4, scale, None, True)
    return _gqa(q4, k4, v4, scale, _lower_right(lq, ctx), False)


def _lower_right(lq: int, ctx: int) -> object:
    """A causal mask aligned to the last key, which flash attention takes without materializing."""
    # imported on first use: the module pulls in torch._dynamo and with it triton, and triton must
    # not be imported before a test sets TRITON_INTERPRET
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(lq, ctx)


def _gqa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: object,
    causal: bool,
) -> torch.Tensor:
    if HAS_ENABLE_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor
) -> torch.Tensor:
    # the backends that take an explicit mask do not all take GQA: expand the heads instead
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _window_mask(lq: int, ctx: int, window: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(ctx - lq, ctx, device=device)[:, None]
    k_pos = torch.arange(ctx, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """All sequences at once: each has one query, so a group of query heads is a short query."""
    n, hq, d = q.shape
    hk = k_cache.shape[2]
    block_size = k_cache.shape[1]
    tables = meta.block_tables.long()
    length = tables.shape[1] * block_size
    k = k_cache[tables].view(n, length, hk, d)
    v = v_cache[tables].view(n, length, hk, d)
    pos = torch.arange(length, device=q.device)[None, :]
    ctx = meta.context_lens.long()[:, None]
    valid = pos < ctx
    if window is not None:
        valid &= pos >= ctx - window
    # slots past a context (padding blocks, a block's tail) may hold anything, NaN included
    k = k.masked_fill(~valid[:, :, None, None], 0.0).permute(0, 2, 1, 3)
    v = v.masked_fill(~valid[:, :, None, None], 0.0).permute(0, 2, 1, 3)
    grouped = q.view(n, hk, hq // hk, d)
    out = F.scaled_dot_product_attention(
        grouped, k, v, attn_mask=valid[:, None, None, :], scale=scale
    )
    return out.reshape(n, hq, d)
