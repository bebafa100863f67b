"""Copies of whole KV blocks inside the pool, for every layer, K and V, in one launch.

The pool is one tensor [layers, 2, blocks, block_size, kv_heads, head_dim]: seen as planes
[layers * 2, blocks, block elements], a block is one contiguous run per plane. torch's
``copy_`` of such a strided view goes through 32-bit index math, so over a pool of tens of
GiB it splits into a dozen or more launches (88-146 µs of host time per question's fork on
an H200 host); ``index_select`` + ``index_copy_`` for several pairs also materialises every
copied block once more. This kernel walks int64 offsets: grid (pairs, planes, chunks of a
block), one program moving one chunk of one plane of one pair.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # elements a program moves


@triton.jit
def _copy_blocks_kernel(storage, pairs, plane_stride, block_elems,
                        CHUNK: tl.constexpr, EVEN: tl.constexpr):
    pair = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    src = tl.load(pairs + 2 * pair).to(tl.int64)
    dst = tl.load(pairs + 2 * pair + 1).to(tl.int64)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    base = storage + plane * plane_stride
    if EVEN:
        tl.store(base + dst * block_elems + offs, tl.load(base + src * block_elems + offs))
    else:
        ok = offs < block_elems
        values = tl.load(base + src * block_elems + offs, mask=ok)
        tl.store(base + dst * block_elems + offs, values, mask=ok)


def copy_blocks(storage: torch.Tensor, pairs: torch.Tensor) -> None:
    """Copies block ``pairs[i, 0]`` onto block ``pairs[i, 1]`` in every plane of the pool
    ``storage`` [layers, 2, blocks, ...] (contiguous); ``pairs`` int64 [n, 2] on its device.
    Destinations must be distinct and none may be a source."""
    if not storage.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.int64:
        raise ValueError(f"pairs must be int64 [n, 2], got {pairs.dtype} {tuple(pairs.shape)}")
    if pairs.shape[0] == 0:
        return
    planes, blocks = storage.shape[0] * storage.shape[1], storage.shape[2]
    block_elems = storage[0, 0, 0].numel()
    grid = (pairs.shape[0], planes, triton.cdiv(block_elems, CHUNK))
    _copy_blocks_kernel[grid](
        storage, pairs.contiguous(), blocks * block_elems, block_elems,
        CHUNK=CHUNK, EVEN=block_elems % CHUNK == 0, num_warps=4,
    )
