"""Tile, warp, stage and split sweep of the paged prefill kernel (graph-replayed GPU time), to
choose `_tiles` and the split count from data: a short question over a long context, or
(``--grid long``) a long data chunk, where compute rather than the KV read bounds the kernel.

    python perf/prefill_sweep.py --contexts 3000,19000,32000 --q 32
    python perf/prefill_sweep.py --grid long --contexts 8000,32000 --q 512,2048
    python perf/prefill_sweep.py --grid long --contexts 4096 --q 32 --seqs 64 --tma

--seqs N: N sequences alike (many sessions asking at once); --tma: the TMA candidate over
64-token pages (it loads by TMA in unsplit launches only, with BLOCK_N = the page).
--ab-lazy: no sweep; the kernel's own plan with deferred rescaling forced on and off, alternated.
--ab-order: likewise with the query tiles walked last first (``LONGEST_FIRST``) and in order.

    python perf/prefill_sweep.py --ab-lazy --contexts 19000,34000 --q 32,51
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_bench import BLOCK, HK, HQ, D, graph_ms, paged_batch  # noqa: E402

from livelm.daemon.kernels.triton_backend import paged_prefill  # noqa: E402

TILES = list(
    itertools.product((64, 128), (32, 64), (4, 8), (2, 3))
)  # BLOCK_M, BLOCK_N, warps, stages
LONG_TILES = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
SPLITS = (0, 8, 16, 24, 33, 48, 66)  # 0: the kernel's own choice
PEAK_FLOPS = 794e12  # bf16 matmul, measured on the H200 (gemm_bench.py)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", default="3000,19000,32000")
    p.add_argument("--q", default="32", help="query rows per sequence, comma-separated")
    p.add_argument("--grid", choices=("short", "long"), default="short")
    p.add_argument("--tiles", default="", help="only these BLOCK_M/BLOCK_N/warps/stages, "
                   "e.g. 64/64/4/2,128/32/4/2")
    p.add_argument("--seqs", type=int, default=1, help="sequences of this shape in the batch")
    p.add_argument("--tma", action="store_true", help="the TMA candidate, 64-token pages")
    p.add_argument("--ab-lazy", action="store_true",
                   help="only the plan's tiles, with deferred rescaling on and off")
    p.add_argument("--ab-order", action="store_true",
                   help="only the plan's tiles, walking the query tiles last first and in order")
    p.add_argument("--splits", default="", help="only these split counts (0: the plan's)")
    p.add_argument("--tma-splits", action="store_true",
                   help="with --tma: split launches load by TMA too")
    p.add_argument("--out", default="")
    args = p.parse_args()
    kernel = (paged_prefill.paged_prefill_attention_tma if args.tma
              else paged_prefill.paged_prefill_attention)
    page = 64 if args.tma else BLOCK
    original = paged_prefill._tiles, paged_prefill._split_tiles
    rows = []
    tiles_grid, splits_grid = (TILES, SPLITS) if args.grid == "short" else (LONG_TILES, (0,))
    if args.splits:
        splits_grid = tuple(int(v) for v in args.splits.split(","))
    paged_prefill.TMA_IN_SPLITS = args.tma_splits
    if args.tiles:
        tiles_grid = [tuple(int(v) for v in t.split("/")) for t in args.tiles.split(",")]
    if args.ab_lazy or args.ab_order:
        tiles_grid = []
    shapes = [(int(c), int(q)) for c in args.contexts.split(",") for q in args.q.split(",")]
    for ctx, q_len in shapes:
        inputs = paged_batch([q_len] * args.seqs, [ctx] * args.seqs, page)

        def attend(splits: int | None, inputs=inputs) -> object:
            return kernel(*inputs, D**-0.5, None, splits)

        kv_us = args.seqs * ctx * HK * D * 2 * 2 / 4.2e12 * 1e6
        visible = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2  # causal (query, key) pairs
        visible *= args.seqs
        flop_us = 4 * visible * HQ * D / PEAK_FLOPS * 1e6
        floor_us = max(kv_us, flop_us)
        if args.ab_lazy:
            rows.extend(_ab_lazy(attend, ctx, q_len, args.seqs, floor_us))
            continue
        if args.ab_order:
            rows.extend(_ab_order(attend, ctx, q_len, args.seqs, floor_us))
            continue
        best = None
        for tiles in tiles_grid:
            paged_prefill._tiles = lambda head_dim, dtype, rows, t=tiles: t  # noqa: E731
            paged_prefill._split_tiles = lambda head_dim, dtype, rows, t=tiles: (*t, 2)  # noqa: E731
            for splits in splits_grid:
                try:
                    us = 1e3 * graph_ms(lambda s=splits: attend(s or None))
                except Exception as exc:  # out of shared memory etc.: note it and go on
                    print(f"  ctx {ctx} tiles {tiles} splits {splits}: {type(exc).__name__}")
                    continue
                rows.append(
                    {"context": ctx, "q": q_len, "tiles": tiles, "splits": splits, "us": us}
                )
                if best is None or us < best["us"]:
                    best = rows[-1]
        paged_prefill._tiles, paged_prefill._split_tiles = original
        default = 1e3 * graph_ms(lambda: attend(None))  # noqa: B023 (called at once)
        print(
            f"ctx {ctx} q {q_len}: current {default:.1f} us, best {best['us']:.1f} us with tiles "
            f"{best['tiles']} splits {best['splits']}; floor {floor_us:.1f} us "
            f"(KV read {kv_us:.1f}, compute {flop_us:.1f})",
            flush=True,
        )
        mine = [r for r in rows if (r["context"], r["q"]) == (ctx, q_len)]
        for r in sorted(mine, key=lambda r: r["us"])[:8]:
            print(f"    {r['us']:7.1f} us  tiles {r['tiles']}  splits {r['splits']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


def _ab_lazy(attend, ctx: int, q_len: int, seqs: int, floor_us: float) -> list[dict]:
    """The plan's launch with deferred rescaling forced on and off (whatever
    ``_defers_rescale`` would choose for it), alternated twice (drift-fair)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    rule = paged_prefill._defers_rescale
    try:
        for lazy in (True, False, False, True):
            paged_prefill._defers_rescale = lambda block_m, use_tma, on=lazy: on
            times[lazy].append(1e3 * graph_ms(lambda: attend(None)))
    finally:
        paged_prefill._defers_rescale = rule
    on, off = min(times[True]), min(times[False])
    print(f"ctx {ctx} q {q_len} x{seqs}: deferred rescale {on:.1f} us, every tile {off:.1f} us "
          f"({off / on:.3f}x); floor {floor_us:.1f} us", flush=True)
    return [{"context": ctx, "q": q_len, "seqs": seqs, "lazy": lazy, "us": min(times[lazy])}
            for lazy in (True, False)]


def _ab_order(attend, ctx: int, q_len: int, seqs: int, floor_us: float) -> list[dict]:
    """The plan's launch walking its query tiles last first (``LONGEST_FIRST``) and in order,
    alternated twice (drift-fair)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    saved = paged_prefill.LONGEST_FIRST
    try:
        for reverse in (True, False, False, True):
            paged_prefill.LONGEST_FIRST = reverse
            times[reverse].append(1e3 * graph_ms(lambda: attend(None)))
    finally:
        paged_prefill.LONGEST_FIRST = saved
    last, first = min(times[True]), min(times[False])
    print(f"ctx {ctx} q {q_len} x{seqs}: longest tiles first {last:.1f} us, in order "
          f"{first:.1f} us ({first / last:.3f}x); floor {floor_us:.1f} us", flush=True)
    return [{"context": ctx, "q": q_len, "seqs": seqs, "longest_first": r, "us": min(times[r])}
            for r in (True, False)]


if __name__ == "__main__":
    raise SystemExit(main())
