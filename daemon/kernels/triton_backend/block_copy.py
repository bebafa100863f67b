"""Copies of whole KV blocks inside the pool, for every layer, K and V, in one launch.

The pool is one tensor [layers, 2, blocks, block_size, kv_heads, head_dim]: seen as planes
[layers * 2, blocks, block elements], a block is one contiguous run per plane. torch's
``index_select`` + ``index_copy_`` (the reference, for several pairs) materialises every
copied block once more (512 MiB for 64 questions forked at once) and copies it twice, and
its strided ``copy_`` of one block falls back to 32-bit index math split into a dozen or more
launches over a pool of tens of GiB. This kernel walks int64 offsets: grid (pairs, planes,
chunks of a block), one program moving one chunk of one plane of one pair. A single pair (a
question's fork) goes as two scalar arguments, so nothing is copied to the device first; its
host time on the H200's host is about the same as torch's (0.10-0.12 against 0.09-0.15 ms:
Triton's Python-side launch), so the gain is in the batched forks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from livelm.daemon.kernels.transfer import to_device_async

CHUNK = 4096  # elements a program moves


@triton.jit(do_not_specialize=["src0", "dst0"])
def _copy_blocks_kernel(storage, pairs, src0, dst0, plane_stride, block_elems,
                        CHUNK: tl.constexpr, EVEN: tl.constexpr, SCALAR: tl.constexpr):
    plane = tl.program_id(1).to(tl.int64)
    if SCALAR:
        src = src0.to(tl.int64)
        dst = dst0.to(tl.int64)
    else:
        pair = tl.program_id(0)
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


def copy_blocks(storage: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """Copies block ``src`` onto block ``dst`` for each (src, dst) of ``pairs`` in every plane
    of the pool ``storage`` [layers, 2, blocks, ...] (contiguous). Destinations must be
    distinct and none may be a source."""
    if not storage.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    if not pairs:
        return
    layers, kv, blocks, *block_shape = storage.shape
    block_elems = 1
    for size in block_shape:
        block_elems *= size
    for src, dst in pairs:
        if not (0 <= src < blocks and 0 <= dst < blocks):
            raise ValueError(f"block pair ({src}, {dst}) outside the pool's {blocks} blocks")
    if len(pairs) == 1:
        index, (src0, dst0) = storage, pairs[0]  # the tensor argument goes unused
    else:
        index = to_device_async(torch.tensor(pairs, dtype=torch.int64), storage.device)
        src0, dst0 = 0, 0
    grid = (len(pairs), layers * kv, triton.cdiv(block_elems, CHUNK))
    _copy_blocks_kernel[grid](
        storage, index, src0, dst0, blocks * block_elems, block_elems,
        CHUNK=CHUNK, EVEN=block_elems % CHUNK == 0, SCALAR=len(pairs) == 1, num_warps=4,
    )

