"""Where a short question's prefill attention spends its time (a diagnostic, not a kernel in use).

A stripped copy of the paged prefill kernel's inner loop (one sequence, every key visible, split
partials written but not merged) in variants that each remove or change one thing:

- ``full``: loads and both matrix products, as the real kernel does;
- ``loads``: the K/V loads only (summed so they stay live): the memory-bound part;
- ``math``: one K/V tile loaded before the loop and reused: the products and the softmax;
- ``prefetch``: ``full``, with the next tile's page numbers loaded one iteration ahead, so the
  K/V addresses do not depend on a load of the same iteration;
- ``knat``: ``full``, with K loaded in its stored [keys, dims] order and transposed for the dot.

If ``full`` is close to ``loads`` + ``math``, memory and compute do not overlap. Times are
graph-replayed medians (µs), one question of --q tokens over --contexts keys, Llama-3.1-8B heads.

    python perf/prefill_probe.py --contexts 3000,19000 --q 32 [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_bench import HK, HQ, D, graph_ms, paged_batch  # noqa: E402

from livelm.daemon.kernels.triton_backend import paged_prefill  # noqa: E402

MODES = {"full": 0, "loads": 1, "math": 2, "prefetch": 3, "knat": 4}
TILES = ((128, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3))  # M, N, warps, stages
SPLITS = (16, 33)


@triton.jit
def _probe_kernel(q_ptr, k_cache, v_cache, ws, table, ctx, scale_log2,
                  stride_kb, stride_ks, stride_kh,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows % GROUP
    qi = tile * (BLOCK_M // GROUP) + rows // GROUP
    q = tl.load(q_ptr + (qi * tl.num_programs(1) * GROUP + heads)[:, None] * HEAD_DIM
                + dims[None, :])
    tiles = ctx // BLOCK_N
    per_split = tl.cdiv(tiles, tl.num_programs(2))
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tiles)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    keys0 = lo * BLOCK_N + tl.arange(0, BLOCK_N)
    page_next = tl.load(table + keys0 // BLOCK_SIZE).to(tl.int64)
    off0 = page_next * stride_kb + (keys0 % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
    k_fixed = tl.load(k_cache + off0[None, :] + dims[:, None])
    v_fixed = tl.load(v_cache + off0[:, None] + dims[None, :])
    for t in range(lo, hi):
        keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
        if MODE == 3:
            page = page_next
            nxt = tl.minimum(t + 1, tiles - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            page_next = tl.load(table + nxt // BLOCK_SIZE).to(tl.int64)
        else:
            page = tl.load(table + keys // BLOCK_SIZE).to(tl.int64)
        kv_off = page * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        if MODE == 2:
            k = k_fixed
            v = v_fixed
        elif MODE == 4:
            k = tl.trans(tl.load(k_cache + kv_off[:, None] + dims[None, :]))
            v = tl.load(v_cache + kv_off[:, None] + dims[None, :])
        else:
            k = tl.load(k_cache + kv_off[None, :] + dims[:, None])
            v = tl.load(v_cache + kv_off[:, None] + dims[None, :])
        if MODE == 1:
            acc += tl.sum(k.to(tl.float32), 1)[None, :] + tl.sum(v.to(tl.float32), 0)[None, :]
        else:
            s = tl.dot(q, k) * scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    cell = ((split * tl.num_programs(0) + tile) * tl.num_programs(1) + kv_head) * BLOCK_M + rows
    tl.store(ws + cell[:, None] * HEAD_DIM + dims[None, :], acc)
    cells = tl.num_programs(2) * tl.num_programs(0) * tl.num_programs(1) * BLOCK_M
    tl.store(ws + cells * HEAD_DIM + cell, m_i + l_i)


def probe(q_len: int, ctx: int, mode: str, tiles: tuple[int, int, int, int],
          splits: int) -> float:
    q, k_cache, v_cache, meta = paged_batch([q_len], [ctx])
    block_m, block_n, warps, stages = tiles
    group = HQ // HK
    q_tiles = triton.cdiv(q_len * group, block_m)
    ws = torch.empty(splits * q_tiles * HK * block_m * (D + 1), device=q.device,
                     dtype=torch.float32)
    qpad = torch.zeros(q_tiles * block_m // group, HQ, D, device=q.device, dtype=q.dtype)
    qpad[:q_len] = q

    def launch() -> None:
        _probe_kernel[(q_tiles, HK, splits)](
            qpad, k_cache, v_cache, ws, meta.block_tables, ctx, D**-0.5 * 1.4427,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, HEAD_DIM=D, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m,
            BLOCK_N=block_n, MODE=MODES[mode], num_warps=warps, num_stages=stages)

    return 1e3 * graph_ms(launch)


def real_kernel_us(q_len: int, ctx: int) -> float:
    """The paged prefill kernel in use (with its split merge) on the same shape."""
    inputs = paged_batch([q_len], [ctx])
    return 1e3 * graph_ms(
        lambda: paged_prefill.paged_prefill_attention(*inputs, D**-0.5, None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", default="3000,19000")
    p.add_argument("--q", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        real = real_kernel_us(args.q, ctx)
        print(f"ctx {ctx} q {args.q}: the real kernel + combine {real:.1f} us", flush=True)
        for tiles in TILES:
            for splits in SPLITS:
                line = {}
                for mode in MODES:
                    try:
                        line[mode] = probe(args.q, ctx, mode, tiles, splits)
                    except Exception as exc:  # out of resources: record and go on
                        line[mode] = f"{type(exc).__name__}"
                rows.append({"context": ctx, "q": args.q, "tiles": tiles, "splits": splits,
                             "real_us": real, **line})
                cells = "  ".join(f"{m} {v:6.1f}" if isinstance(v, float) else f"{m} {v}"
                                  for m, v in line.items())
                print(f"  tiles {tiles} splits {splits:3d}: {cells}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
