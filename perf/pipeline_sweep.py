"""Do the attention kernels prefetch their key tiles? The page-carrying loop (``CARRY_PAGES``)
against the loop it replaced, over tiles and pipeline depths, at the engine's shapes.

Triton's pipeliner issued a key tile's copies only after the previous tile's products when the
tile's addresses came from a block-table load of the same iteration, and waited on them at
once, at any ``num_stages``: the loads were never in flight during compute. Looking the pages
up one iteration ahead lets ``num_stages >= 3`` keep the next tile in flight. This sweep times,
per shape, the kernels as they were bound before (``CARRY`` off, two stages, the tiles of
then; prefill splits for two programs per SM, rounded down as now), as bound now, and (unless
``--quick``) with pages carried over a grid of tiles and stages; it checks every variant's
output against the first, prints the best, and lists each compiled variant's registers,
spills and wait depths. 64-token KV blocks, as the engine's default; Llama-3.1-8B heads.

    python perf/pipeline_sweep.py [--quick] --out results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_resources import compiled, describe  # noqa: E402
from kernels_bench import D, graph_ms, paged_batch  # noqa: E402

from livelm.daemon.kernels.triton_backend import paged_decode, paged_prefill  # noqa: E402

PAGE = 64
SPLIT_TILES = [  # (BLOCK_M, BLOCK_N, warps, stages): split prefill, pointer loads
    (128, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 4, 5),
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4),
]
UNSPLIT_TILES = [  # unsplit prefill, TMA loads (BLOCK_N is the page)
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
    (128, 64, 8, 4),
]
DECODE_TILES = [  # (BLOCK_N, warps, stages)
    (64, 4, 3), (64, 4, 4), (32, 4, 3), (32, 4, 4), (32, 4, 6), (64, 8, 3), (128, 4, 3),
]
PREFILL = {  # name: (query tokens per sequence, keys per sequence, sequences, split, tiles before)
    "question 32 @ 19k": (32, 19000, 1, True, (128, 64, 4, 2)),
    "question 32 @ 32k": (32, 32000, 1, True, (128, 64, 4, 2)),
    "record 51 @ 32k": (51, 32000, 1, True, (128, 64, 4, 2)),
    "64 questions 32 @ 4k": (32, 4096, 64, False, (128, 64, 4, 2)),
    "chunk 4096 @ 8k": (4096, 8192, 1, False, (64, 64, 4, 2)),
}
DECODE = {"decode 1 @ 19k": (1, 19000), "decode 64 @ 4k": (64, 4096)}
DECODE_BEFORE = (64, 4, 2)  # tiles, with splits for four programs per SM


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--quick", action="store_true", help="only the kernels before and as bound")
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows: list[dict] = []
    for name, (q_len, ctx, seqs, split, before) in PREFILL.items():
        if args.only in name:
            rows.extend(_prefill_case(name, q_len, ctx, seqs, split, before, args.quick))
    for name, (seqs, ctx) in DECODE.items():
        if args.only in name:
            rows.extend(_decode_case(name, seqs, ctx, args.quick))
    variants = _compiled_variants()
    if args.out:
        Path(args.out).write_text(json.dumps({"timings": rows, "compiled": variants}, indent=2))
    return 0


def _compiled_variants() -> list[dict]:
    """Every attention kernel variant compiled above: registers, spills, programs per SM, and
    the depth of its copy pipeline (the ``num`` of each async wait in its TTGIR: 0 means
    the loop waits on the copies it has just issued, nothing in flight during compute)."""
    rows = []
    for fn in (paged_prefill._prefill_kernel, paged_decode._decode_split_kernel):
        for kernel in compiled(fn):
            row = describe(kernel)
            ttgir = kernel.asm.get("ttgir", "") if hasattr(kernel, "asm") else ""
            row["async_waits"] = [int(n) for n in re.findall(r"async_wait[^{]*\{num = (\d+)", ttgir)]
            row["tma_copies"] = ttgir.count("async_tma_copy_global_to_local")
            rows.append(row)
            print(f"{row['name'][:24]:24s} w{row['warps']} s{row['stages']} regs {row['registers']} "
                  f"spills {row['spills']} smem {row['shared_bytes'] // 1024} KiB "
                  f"{row['programs_per_sm']}/SM waits {row['async_waits']} tma {row['tma_copies']} "
                  f"{row['constants']}", flush=True)
    return rows


def _prefill_case(name: str, q_len: int, ctx: int, seqs: int, split: bool,
                  before: tuple, quick: bool) -> list[dict]:
    inputs = paged_batch([q_len] * seqs, [ctx] * seqs, PAGE)
    plan = paged_prefill._plan(inputs[0], inputs[1], inputs[3])
    grid = [] if quick else SPLIT_TILES if split else UNSPLIT_TILES
    split_choices = (None, plan["splits"]) if split else (None,)  # two per SM, the plan's

    def run(carry: bool, tiles: tuple | None, splits: int | None) -> Callable[[], torch.Tensor]:
        def attend() -> torch.Tensor:
            return paged_prefill.paged_prefill_attention_tma(*inputs, D**-0.5, None, splits)
        return _with(paged_prefill, carry, tiles, attend)

    variants = [(f"before: no carry, {before}", False, before, None), ("as bound", True, None, None)]
    variants += [(f"carry {t} splits {s or 'plan'}", True, t, s) for t in grid for s in split_choices]
    print(f"{name}: plan {plan}", flush=True)
    return _time(name, variants, run)


def _decode_case(name: str, seqs: int, ctx: int, quick: bool) -> list[dict]:
    inputs = paged_batch([1] * seqs, [ctx] * seqs, PAGE)
    splits = paged_decode.graph_splits(seqs, inputs[1].shape[2], inputs[0].device)
    split_choices = (splits, max(1, splits // 2)) if splits > 1 else (splits,)

    def run(carry: bool, tiles: tuple | None, n: int | None) -> Callable[[], torch.Tensor]:
        def attend() -> torch.Tensor:
            return paged_decode.paged_decode_attention(*inputs, D**-0.5, None, n or splits)
        return _with(paged_decode, carry, tiles, attend)

    old = paged_decode.choose_splits(seqs * inputs[1].shape[2], 4096, inputs[0].device, per_sm=4)
    variants = [(f"before: no carry, {DECODE_BEFORE} splits {old}", False, DECODE_BEFORE, old),
                (f"as bound, splits {splits}", True, None, None)]
    grid = [] if quick else DECODE_TILES
    variants += [(f"carry {t} splits {s}", True, t, s) for t in grid for s in split_choices]
    print(f"{name}: graph splits {splits}", flush=True)
    return _time(name, variants, run)


def _with(module, carry: bool, tiles: tuple | None, fn: Callable[[], torch.Tensor]):
    """fn run with the module's CARRY_PAGES and (when given) its tiles overridden: prefill's
    split launches then plan their splits for two programs per SM."""
    def call() -> torch.Tensor:
        saved = module.CARRY_PAGES, module._tiles, getattr(module, "_split_tiles", None)
        module.CARRY_PAGES = carry
        if tiles is not None:
            module._tiles = lambda *a, t=tiles: t
            if saved[2] is not None:
                module._split_tiles = lambda *a, t=tiles: (*t, 2)
        try:
            return fn()
        finally:
            module.CARRY_PAGES, module._tiles = saved[:2]
            if saved[2] is not None:
                module._split_tiles = saved[2]
    return call


def _time(name: str, variants: list, run) -> list[dict]:
    rows, reference = [], None
    for label, carry, tiles, splits in variants:
        call = run(carry, tiles, splits)
        try:
            out = call()
            us = 1e3 * graph_ms(call)
        except Exception as exc:  # out of shared memory, a compile failure: note it, go on
            print(f"  {label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        if reference is None:
            reference = out
        err = (out.float() - reference.float()).abs().max().item()
        rows.append({"case": name, "variant": label, "us": us, "max_abs_diff": err})
    base = rows[0]["us"] if rows else float("nan")
    for r in sorted(rows, key=lambda r: r["us"])[:6] + rows[:2]:
        print(f"    {r['us']:8.1f} us  {base / r['us']:5.2f}x  diff {r['max_abs_diff']:.2e}  "
              f"{r['variant']}", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
