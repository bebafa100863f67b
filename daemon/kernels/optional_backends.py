"""Adapters for optional attention libraries: flash-attn, xFormers and FlashInfer.

Each ``*_candidates()`` imports its library when called and raises ``BackendUnavailable`` with
the reason when it is missing or its compiled operators do not load, so the dispatcher can show
why it was skipped. The adapters only translate our paged layout (``[blocks, block_size, Hk, D]``
caches, block tables, context lengths) into each library's call; the dispatcher's check decides
whether the result is right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.candidates import BackendUnavailable, Candidate, Target

HALF = (torch.float16, torch.bfloat16)


def _needs_cuda_half(target: Target) -> str | None:
    if target.device.type != "cuda":
        return f"needs CUDA, not {target.device.type}"
    if target.dtype not in HALF:
        return f"needs float16 or bfloat16, not {target.dtype}"
    return None


def _attention_pair(backend: str, name: str, fn: Callable, supports: Callable) -> list[Candidate]:
    return [
        Candidate("prefill_attention", backend, name, fn, supports, False),
        Candidate("decode_attention", backend, name, fn, supports, False),
    ]


# --- flash-attn ------------------------------------------------------------------------------


def flash_attn_candidates() -> list[Candidate]:
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"flash_attn does not load: {exc}") from exc
    fn = _flash_attn(flash_attn_varlen_func, flash_attn_with_kvcache)
    return _attention_pair("flash_attn", "flash_attn.paged", fn, _flash_attn_supports)


def _flash_attn_supports(target: Target) -> str | None:
    reason = _needs_cuda_half(target)
    if reason is None and target.block_size % 256:
        reason = f"paged KV needs a block size that is a multiple of 256, not {target.block_size}"
    if reason is None and target.capability is not None and target.capability < (8, 0):
        reason = f"needs compute capability 8.0 or newer, not {target.capability}"
    return reason


def _flash_window(window: int | None) -> tuple[int, int]:
    # ours: a query at p sees keys in (p - window, p]; flash-attn counts the left edge inclusively
    return (-1, -1) if window is None else (window - 1, 0)


def _flash_attn(varlen: Callable, with_kvcache: Callable) -> Callable:
    def flash_attn_paged(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        window = _flash_window(sliding_window)
        if meta.decode_only:
            out = with_kvcache(
                q.unsqueeze(1),
                k_cache,
                v_cache,
                cache_seqlens=meta.context_lens,
                block_table=meta.block_tables,
                softmax_scale=scale,
                causal=True,
                window_size=window,
            )
            return out.squeeze(1)
        cu_k = torch.nn.functional.pad(torch.cumsum(meta.context_lens, 0, dtype=torch.int32), (1, 0))
        starts = meta.query_starts_list
        max_q = max(b - a for a, b in zip(starts, starts[1:], strict=False))
        return varlen(
            q,
            k_cache,
            v_cache,
            meta.query_starts,
            cu_k,
            max_q,
            max(meta.context_lens_list),
            softmax_scale=scale,
            causal=True,
            window_size=window,
            block_table=meta.block_tables,
        )

    return flash_attn_paged


# --- xFormers --------------------------------------------------------------------------------


def xformers_candidates() -> list[Candidate]:
    try:
        from xformers import _cpp_lib
        from xformers.ops import fmha, memory_efficient_attention_forward
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"xformers does not load: {exc}") from exc
    failure = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if failure is not None:
        raise BackendUnavailable(f"xformers' compiled operators do not load: {failure}")
    mask_type = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask
    fn = _xformers(memory_efficient_attention_forward, mask_type)
    return _attention_pair("xformers", "xformers.packed", fn, _xformers_supports)


def _xformers_supports(target: Target) -> str | None:
    reason = _needs_cuda_half(target)
    if reason is None and target.sliding_window is not None:
        reason = "this adapter does not pass sliding windows to xFormers"
    return reason


def _xformers(attention: Callable, mask_type: type) -> Callable:
    def xformers_packed(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        # xFormers has no paged layout of ours: pack each sequence's context, heads expanded
        starts, lens = meta.query_starts_list, meta.context_lens_list
        group = q.shape[1] // k_cache.shape[2]
        k = _packed(k_cache, meta).repeat_interleave(group, dim=1)
        v = _packed(v_cache, meta).repeat_interleave(group, dim=1)
        q_lens = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        bias = mask_type.from_seqlens(q_lens, lens)
        out = attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias, scale=scale)
        return out[0]

    return xformers_packed


def _packed(cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    block_size = cache.shape[1]
    parts = []
    for b, n in enumerate(meta.context_lens_list):
        blocks = meta.block_tables[b, : (n + block_size - 1) // block_size].long()
        parts.append(cache[blocks].flatten(0, 1)[:n])
    return torch.cat(parts)


# --- FlashInfer ------------------------------------------------------------------------------

WORKSPACE_BYTES = 128 << 20


def flashinfer_candidates() -> list[Candidate]:
    try:
        import flashinfer
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"flashinfer does not load: {exc}") from exc
    prefill = getattr(flashinfer, "BatchPrefillWithPagedKVCacheWrapper", None)
    decode = getattr(flashinfer, "BatchDecodeWithPagedKVCacheWrapper", None)
    if prefill is None or decode is None or not hasattr(prefill, "plan"):
        raise BackendUnavailable("flashinfer has no paged wrappers with plan() (needs 0.2 or newer)")
    prefill_fn, decode_fn = _flashinfer(prefill, decode=False), _flashinfer(decode, decode=True)
    return [
        Candidate("prefill_attention", "flashinfer", "flashinfer.paged_prefill", prefill_fn,
                  _needs_cuda_half, False),
        Candidate("decode_attention", "flashinfer", "flashinfer.paged_decode", decode_fn,
                  _needs_cuda_half, False),
    ]


def _page_layout(meta: AttentionMeta, page: int) -> tuple[torch.Tensor, ...]:
    """FlashInfer's CSR page lists: indptr, page ids, tokens used in each last page."""
    ctx = meta.context_lens.long()
    pages = (ctx + page - 1) // page
    indptr = torch.nn.functional.pad(torch.cumsum(pages, 0), (1, 0)).int()
    columns = torch.arange(meta.block_tables.shape[1], device=ctx.device)
    indices = meta.block_tables[columns[None, :] < pages[:, None]].int()
    last = (ctx - (pages - 1) * page).int()
    return indptr, indices, last


def _flashinfer(wrapper_type: type, decode: bool) -> Callable:
    wrappers: dict[torch.device, object] = {}  # one per device, made at first use

    def wrapper_for(device: torch.device) -> object:
        if device not in wrappers:
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            wrappers[device] = wrapper_type(workspace, "NHD")
        return wrappers[device]

    def flashinfer_paged(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        wrapper = wrapper_for(q.device)
        page, hk, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        indptr, indices, last = _page_layout(meta, page)
        layout = (indptr, indices, last) if decode else (meta.query_starts, indptr, indices, last)
        left = -1 if sliding_window is None else sliding_window - 1
        extra = {} if decode else {"causal": True}
        wrapper.plan(
            *layout,
            q.shape[1],
            hk,
            d,
            page,
            sm_scale=scale,
            window_left=left,
            q_data_type=q.dtype,
            kv_data_type=k_cache.dtype,
            **extra,
        )
        return wrapper.run(q, (k_cache, v_cache))

    return flashinfer_paged
