"""Would TMA loads speed up our paged attention? A diagnostic, not a kernel in use.

The prefill attention loop (every key visible, split partials written, no merge) over a
paged KV cache, its K/V tiles loaded three ways:

- ``gather16``: pointer loads through the block table with 16-token pages, as the kernel in
  use does (one page number per key);
- ``gather64``: the same with 64-token pages (one page number per key tile);
- ``tma64``: 64-token pages, each tile one TMA descriptor load ([64 keys, head_dim] at row
  page * 64 of the cache seen as [blocks * 64, kv_heads * head_dim]);
- ``tma64_ws``: the same loop with triton's automatic warp specialisation (where the
  compiler refuses it on this GPU, the table says so).

Shapes (Llama-3.1-8B heads, per layer): a 32-token question over 19k keys, 64 questions over
4k keys each, a 2048-token data chunk over 8k. Times are graph-replayed medians in µs, with
the matmul rate they amount to. ``--check`` compares the three on tiny shapes in float32
(on the CPU it runs under TRITON_INTERPRET=1).

    python perf/tma_probe.py [--out FILE.json]
    TRITON_INTERPRET=1 python perf/tma_probe.py --check
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

HQ, HK, D = 32, 8, 128
GROUP = HQ // HK
# (TMA, page size, warp specialised loop)
MODES = {"gather16": (0, 16, 0), "gather64": (0, 64, 0), "tma64": (1, 64, 0),
         "tma64_ws": (1, 64, 1)}
CONFIGS = ((128, 4, 2), (128, 4, 3), (128, 8, 2), (64, 4, 2))  # BLOCK_M, warps, stages
SHAPES = {  # name: (sequences, queries each, keys each, key splits)
    "question 32 over 19k": (1, 32, 19008, 33),
    "64 questions over 4k": (64, 32, 4096, 1),
    "chunk 2048 over 8k": (1, 2048, 8192, 1),
}


@triton.jit
def _attend_tile(t, q, acc, m_i, l_i, k_cache, v_cache, k_desc, v_desc, table, kv_head,
                 scale_log2, stride_kb, stride_ks, stride_kh, HEAD_DIM: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if TMA:
        row = tl.load(table + t) * PAGE  # BLOCK_N == PAGE: one page per tile
        k = k_desc.load([row, kv_head * HEAD_DIM])
        v = v_desc.load([row, kv_head * HEAD_DIM])
        s = tl.dot(q, tl.trans(k)) * scale_log2
    else:
        page = tl.load(table + keys // PAGE).to(tl.int64)
        kv_off = page * stride_kb + (keys % PAGE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache + kv_off[None, :] + dims[:, None])
        v = tl.load(v_cache + kv_off[:, None] + dims[None, :])
        s = tl.dot(q, k) * scale_log2
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _loop_kernel(q_ptr, k_cache, v_cache, k_desc, v_desc, ws, tables, ctx, q_tiles, scale_log2,
                 stride_kb, stride_ks, stride_kh, stride_bt,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
                 WS: tl.constexpr):
    seq = tl.program_id(0) // q_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows % GROUP
    qi = (tl.program_id(0) * (BLOCK_M // GROUP) + rows // GROUP).to(tl.int64)
    q = tl.load(q_ptr + (qi * num_heads + heads)[:, None] * HEAD_DIM + dims[None, :])
    tiles = ctx // BLOCK_N
    per_split = tl.cdiv(tiles, tl.num_programs(2))
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tiles)
    table = tables + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if WS:  # triton's automatic warp specialisation (a loader warp group feeding the math)
        for t in tl.range(lo, hi, warp_specialize=True):
            acc, m_i, l_i = _attend_tile(t, q, acc, m_i, l_i, k_cache, v_cache, k_desc, v_desc,
                                         table, kv_head, scale_log2, stride_kb, stride_ks,
                                         stride_kh, HEAD_DIM, PAGE, BLOCK_N, TMA)
    else:
        for t in range(lo, hi):
            acc, m_i, l_i = _attend_tile(t, q, acc, m_i, l_i, k_cache, v_cache, k_desc, v_desc,
                                         table, kv_head, scale_log2, stride_kb, stride_ks,
                                         stride_kh, HEAD_DIM, PAGE, BLOCK_N, TMA)
    cell = ((split * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(1) + kv_head)
    cell = cell.to(tl.int64) * BLOCK_M + rows
    tl.store(ws + cell[:, None] * HEAD_DIM + dims[None, :], acc / l_i[:, None])


class Case:
    """One shape's inputs for one page size: q padded to whole query tiles, a cache whose
    blocks are handed out in scrambled order, and TMA descriptors over it."""

    def __init__(self, seqs: int, q_len: int, ctx: int, page: int, block_m: int,
                 dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        self.q_tiles = math.ceil(q_len * GROUP / block_m)
        self.ctx, self.page, self.block_m = ctx, page, block_m
        rows = seqs * self.q_tiles * block_m // GROUP
        self.q = torch.randn(rows, HQ, D, generator=gen, device=device).to(dtype)
        per_seq = ctx // page
        blocks = seqs * per_seq
        keys = torch.randn(2, blocks * page, HK, D, generator=gen, device=device).to(dtype)
        self.k_cache = keys[0].reshape(blocks, page, HK, D)
        self.v_cache = keys[1].reshape(blocks, page, HK, D)
        order = torch.randperm(blocks, generator=gen, device=device).to(torch.int32)
        self.tables = order.view(seqs, per_seq)
        flat = (blocks * page, HK * D)
        self.k_desc = TensorDescriptor.from_tensor(self.k_cache.view(flat), [page, D])
        self.v_desc = TensorDescriptor.from_tensor(self.v_cache.view(flat), [page, D])
        self.seqs = seqs

    def run(self, tma: bool, warps: int, stages: int, splits: int,
            ws_loop: bool = False) -> torch.Tensor:
        ws = torch.empty(splits * self.seqs * self.q_tiles * HK * self.block_m * D,
                         device=self.q.device, dtype=torch.float32)
        _loop_kernel[(self.seqs * self.q_tiles, HK, splits)](
            self.q, self.k_cache, self.v_cache, self.k_desc, self.v_desc, ws, self.tables,
            self.ctx, self.q_tiles, D**-0.5 * 1.4426950408889634,
            self.k_cache.stride(0), self.k_cache.stride(1), self.k_cache.stride(2),
            self.tables.stride(0),
            GROUP=GROUP, HEAD_DIM=D, PAGE=self.page, BLOCK_M=self.block_m, BLOCK_N=64,
            TMA=tma, WS=ws_loop, num_warps=warps, num_stages=stages)
        return ws


def check() -> int:
    """The three loads give the same partials on a tiny float32 case (one split)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outs = {}
    for mode, (tma, page, ws_loop) in MODES.items():
        if ws_loop and not torch.cuda.is_available():
            continue  # a compiler feature: nothing to interpret
        case = Case(2, 8, 256, page, 32, torch.float32, device, seed=1)
        if page == 16:  # the same keys in 16-token pages: reorder to match the 64-token case
            ref = Case(2, 8, 256, 64, 32, torch.float32, device, seed=1)
            case.k_cache, case.v_cache, case.tables = _as_16(ref)
        outs[mode] = case.run(bool(tma), 4, 2, 1, bool(ws_loop))
    base = outs["gather64"]
    for mode, out in outs.items():
        err = (out - base).abs().max().item()
        print(f"{mode}: max difference from gather64 {err:.2e}")
        if err > 1e-3:
            return 1
    return 0


def _as_16(ref: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ref's cache and tables re-cut into 16-token pages holding the same keys in order."""
    k = ref.k_cache.reshape(-1, 16, HK, D)
    v = ref.v_cache.reshape(-1, 16, HK, D)
    sub = ref.page // 16
    tables = (ref.tables.long()[:, :, None] * sub + torch.arange(sub, device=k.device))
    return k, v, tables.reshape(ref.tables.shape[0], -1).to(torch.int32)


def bench(out: str) -> int:
    from kernels_bench import graph_ms

    rows = []
    for name, (seqs, q_len, ctx, splits) in SHAPES.items():
        flop = 4 * seqs * q_len * ctx * HQ * D
        cases: dict[tuple[int, int], Case] = {}
        for block_m, warps, stages in CONFIGS:
            line = []
            for mode, (tma, page, ws_loop) in MODES.items():
                if (page, block_m) not in cases:
                    cases[page, block_m] = Case(seqs, q_len, ctx, page, block_m,
                                                torch.bfloat16, torch.device("cuda"))
                case = cases[page, block_m]

                def launch(c=case, t=tma, w=warps, st=stages, sp=splits, x=ws_loop) -> object:
                    return c.run(bool(t), w, st, sp, bool(x))

                try:
                    us = 1e3 * graph_ms(launch)
                except Exception as exc:  # out of resources, a lowering refused: note it
                    line.append(f"{mode} {type(exc).__name__}")
                    continue
                rows.append({"shape": name, "mode": mode, "block_m": block_m, "warps": warps,
                             "stages": stages, "splits": splits, "us": us,
                             "tflops": flop / us / 1e6})
                line.append(f"{mode} {us:7.1f} us ({flop / us / 1e6:4.0f} TFLOP/s)")
            print(f"{name:22s} M{block_m} w{warps} s{stages}: " + "  ".join(line), flush=True)
    if out:
        Path(out).write_text(json.dumps(rows, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return check() if args.check else bench(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
