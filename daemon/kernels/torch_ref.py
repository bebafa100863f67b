"""Reference kernels in plain PyTorch: always available, the numerical yardstick for the rest.

They follow Hugging Face transformers' eager Llama math step for step (float32 norms,
rotate-half RoPE, softmax in float32), so float32 results match it to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.ops import Kernels, SamplingBatch
from livelm.daemon.kernels.transfer import to_device_async


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    table = cos_sin[positions]  # [N, 2, D] float32
    cos = table[:, 0].to(q.dtype).unsqueeze(1)
    sin = table[:, 1].to(q.dtype).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


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
    q, k = rope(q, k, positions, cos_sin)
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(swiglu(gate_up), weight)


def _gather_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = table[: (length + block_size - 1) // block_size]
    return cache[blocks].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    starts = meta.query_starts_list
    for b, ctx in enumerate(meta.context_lens_list):
        lo, hi = starts[b], starts[b + 1]
        k = _gather_kv(k_cache, meta.block_tables[b], ctx).repeat_interleave(group, dim=1)
        v = _gather_kv(v_cache, meta.block_tables[b], ctx).repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = torch.matmul(q[lo:hi].transpose(0, 1), k.permute(1, 2, 0)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[lo:hi] = torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)
    return out


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= p
    drop_sorted[0] = False  # the likeliest token stays, even for a p that rounds to 0
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    greedy = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy
    temperature = params.temperature.tolist()
    top_p = params.top_p.tolist()
    top_k = params.top_k.tolist()
    out = greedy.clone()
    for row, t in enumerate(temperature):
        if t <= 0.0:
            continue
        scaled = _filter_top_p(_filter_top_k(logits[row].float() / t, top_k[row]), top_p[row])
        probs = torch.softmax(scaled, dim=-1)
        gen = params.generators[row]
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        out[row] = torch.multinomial(probs, 1, generator=gen).to(out.device)[0]
    return out


def copy_kv_blocks(storage: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """One strided copy for one pair; for several, a gather of the source blocks, then a
    scatter onto the destinations."""
    if len(pairs) == 1:
        (src, dst), = pairs
        storage[:, :, dst].copy_(storage[:, :, src])
    elif pairs:
        index = to_device_async(torch.tensor(pairs, dtype=torch.int64), storage.device)
        storage.index_copy_(2, index[:, 1], storage.index_select(2, index[:, 0]))


REFERENCE = Kernels(
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    rope=rope,
    rope_store_kv=rope_store_kv,
    swiglu=swiglu,
    linear=F.linear,
    swiglu_linear=swiglu_linear,
    prefill_attention=paged_attention,
    decode_attention=paged_attention,
    sample=sample,
    copy_kv_blocks=copy_kv_blocks,
    graph_unsafe=frozenset({"prefill_attention", "decode_attention"}),
)
