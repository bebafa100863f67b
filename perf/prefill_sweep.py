"""Tile, warp, stage and split sweep of the paged prefill kernel for a short question over a
long context (graph-replayed GPU time), to choose `_tiles` and the split count from data.

    python perf/prefill_sweep.py --contexts 3000,19000,32000 --q 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_bench import HK, D, graph_ms, paged_batch  # noqa: E402

from livelm.daemon.kernels.triton_backend import paged_prefill  # noqa: E402

TILES = list(
    itertools.product((64, 128), (32, 64), (4, 8), (2, 3))
)  # BLOCK_M, BLOCK_N, warps, stages
SPLITS = (0, 8, 16, 24, 33, 48, 66)  # 0: the kernel's own choice


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", default="3000,19000,32000")
    p.add_argument("--q", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args()
    original = paged_prefill._tiles
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        inputs = paged_batch([args.q], [ctx])

        def attend(splits: int | None, inputs=inputs) -> object:
            return paged_prefill.paged_prefill_attention(*inputs, D**-0.5, None, splits)

        floor_us = ctx * HK * D * 2 * 2 / 4.2e12 * 1e6
        best = None
        for tiles in TILES:
            paged_prefill._tiles = lambda head_dim, dtype, rows, t=tiles: t  # noqa: E731
            for splits in SPLITS:
                try:
                    us = 1e3 * graph_ms(lambda s=splits: attend(s or None))
                except Exception as exc:  # out of shared memory etc.: note it and go on
                    print(f"  ctx {ctx} tiles {tiles} splits {splits}: {type(exc).__name__}")
                    continue
                rows.append({"context": ctx, "tiles": tiles, "splits": splits, "us": us})
                if best is None or us < best["us"]:
                    best = rows[-1]
        paged_prefill._tiles = original
        default = 1e3 * graph_ms(lambda: attend(None))  # noqa: B023 (called at once)
        print(
            f"ctx {ctx}: current {default:.1f} us, best {best['us']:.1f} us with tiles "
            f"{best['tiles']} splits {best['splits']}; KV floor {floor_us:.1f} us",
            flush=True,
        )
        for r in sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["us"])[:8]:
            print(f"    {r['us']:7.1f} us  tiles {r['tiles']}  splits {r['splits']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
