"""TMA descriptor loads of the paged KV cache, for the attention kernels' TMA variants.

With KV blocks of exactly one key tile (PAGE tokens), a tile of one kv head is one box of the
cache seen as [blocks * PAGE, kv_heads * head_dim]: one descriptor copy, instead of a pointer
gather through the block table per key. Host-side descriptors (triton 3.3+) are plain kernel
arguments, so CUDA graphs capture them; the cache tensors never move.
"""

from __future__ import annotations

import torch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older triton: the TMA variants are unavailable, the others are not
    TensorDescriptor = None

PAGE = 64  # tokens per KV block the TMA variants need: one key tile (BLOCK_N)


def unavailable_reason() -> str | None:
    return None if TensorDescriptor is not None else "this triton has no tensor descriptors"


def check_page(k_cache: torch.Tensor) -> None:
    if k_cache.shape[1] != PAGE:
        raise ValueError(f"the TMA variant needs {PAGE}-token KV blocks, got {k_cache.shape[1]}")


def kernel_args(k_cache: torch.Tensor, v_cache: torch.Tensor, use_tma: bool) -> tuple[object, object]:
    """What a kernel's k_desc and v_desc arguments receive: the descriptors, or (unused there)
    the caches themselves."""
    return descriptors(k_cache, v_cache) if use_tma else (k_cache, v_cache)


def descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[object, object]:
    """K and V, each one page of one kv head per box."""
    blocks, page, kv_heads, head_dim = k_cache.shape
    flat = (blocks * page, kv_heads * head_dim)
    k_desc, v_desc = (
        TensorDescriptor.from_tensor(c.view(flat), [page, head_dim]) for c in (k_cache, v_cache)
    )
    return k_desc, v_desc
