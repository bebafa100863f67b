"""The Gluon prefill attention kernel against the Triton one (the bound TMA candidate, which
loads split launches by pointer), graph-replayed GPU time at the bench's shapes, with each
result checked against the torch reference first.

    python perf/gluon_ab.py --out perf/results/gluon-ab.json
    python perf/gluon_ab.py --configs 128/8/4/1,128/8/3/1   # BLOCK_M/warps/stages/per-SM

A question's KV floor is its context's K and V read once at 4.2 TB/s; a chunk's is the larger
of that and its causal products at the measured bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_bench import HK, HQ, D, graph_ms, paged_batch  # noqa: E402
from run_meta import meta  # noqa: E402

from livelm.daemon.kernels import torch_ref  # noqa: E402
from livelm.daemon.kernels.triton_backend import gluon_prefill, paged_prefill  # noqa: E402

PEAK_FLOPS = 794e12
SHAPES = [  # (label, query lengths, context lengths)
    ("question 2.6k", [32], [2600]),
    ("question 8k", [32], [8205]),
    ("question 19k", [32], [19_000]),
    ("question 32k", [32], [32_000]),
    ("record 19k", [51], [19_000]),
    ("64 questions 4k", [32] * 64, [4096] * 64),
    ("chunk 1105 @ 8k", [1105], [8205]),
    ("chunk 4096 @ 8k", [4096], [8205]),
    ("chunk 4096 @ 19k", [4096], [19_000]),
]


def floor_us(q_lens: list[int], ctx_lens: list[int]) -> float:
    kv = sum(ctx_lens) * HK * D * 2 * 2 / 4.2e12
    pairs = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(q_lens, ctx_lens, strict=True))
    return 1e6 * max(kv, 4 * pairs * HQ * D / PEAK_FLOPS)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def configure(config: str) -> None:
    block_m, warps, stages, per_sm = (int(v) for v in config.split("/"))
    gluon_prefill.BLOCK_M, gluon_prefill.WARPS = block_m, warps
    gluon_prefill.STAGES, gluon_prefill.SPLIT_PROGRAMS_PER_SM = stages, per_sm


def measure(label: str, q_lens: list[int], ctx_lens: list[int], configs: list[str]) -> dict:
    """One shape: the Triton kernel's time and error, then each Gluon config's."""
    q, kc, vc, meta = paged_batch(q_lens, ctx_lens, 64)
    ref = torch_ref.paged_attention(q, kc, vc, meta, D**-0.5, None)
    triton_fn = paged_prefill.paged_prefill_attention_tma
    row = {"shape": label, "floor_us": floor_us(q_lens, ctx_lens),
           "triton_us": 1e3 * graph_ms(lambda: triton_fn(q, kc, vc, meta, D**-0.5, None)),
           "triton_err": rel_error(triton_fn(q, kc, vc, meta, D**-0.5, None), ref),
           "gluon": {}}
    for config in configs:
        configure(config)
        fn = gluon_prefill.paged_prefill_attention_gluon
        try:
            err = rel_error(fn(q, kc, vc, meta, D**-0.5, None), ref)
            us = 1e3 * graph_ms(lambda fn=fn: fn(q, kc, vc, meta, D**-0.5, None))
        except Exception as exc:  # noqa: BLE001 (a config that does not fit: noted, go on)
            row["gluon"][config] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        row["gluon"][config] = {"us": us, "err": err}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", default="128/8/4/1,128/8/3/1,128/8/5/1,64/4/3/2")
    p.add_argument("--shapes", default="", help="only labels containing one of these, comma-separated")
    p.add_argument("--out", default="")
    args = p.parse_args()
    configs = args.configs.split(",")
    wanted = [s for s in args.shapes.split(",") if s]
    rows = []
    print(f"{'shape':<18} {'floor us':>9} {'triton':>8} " + " ".join(f"{c:>12}" for c in configs))
    for label, q_lens, ctx_lens in SHAPES:
        if wanted and not any(w in label for w in wanted):
            continue
        row = measure(label, q_lens, ctx_lens, configs)
        rows.append(row)
        cells = []
        for config in configs:
            r = row["gluon"][config]
            cells.append(f"{r['us']:7.1f} {r['err']:.0e}" if "us" in r else "      failed")
        print(f"{label:<18} {row['floor_us']:9.1f} {row['triton_us']:8.1f} " + " ".join(
            f"{c:>12}" for c in cells), flush=True)
        for config in configs:
            if "error" in row["gluon"][config]:
                print(f"    {config}: {row['gluon'][config]['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
