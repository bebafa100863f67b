"""Registers, spills and shared memory of our attention kernels as compiled for the GPU, and
the programs per SM those allow: the first thing to read when a kernel runs far from its
floor (is a 128-row tile spilling? does one program fill an SM?).

Runs the paged prefill and decode kernels once at Llama-3.1-8B shapes (a 32-token question
over 19k keys, a pushed record of 48 tokens, 64 questions over 4k, a 2048-token chunk over
8k, a decode batch), then lists every variant triton compiled. Needs CUDA.

    python perf/kernel_resources.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_bench import D, paged_batch  # noqa: E402

from livelm.daemon.kernels.triton_backend import paged_decode, paged_prefill  # noqa: E402

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
MAX_WARPS_PER_SM = 64

SHAPES = {  # name: (query tokens per sequence, keys per sequence, sequences)
    "question 32 over 19k": (32, 19000, 1),
    "record 48 over 19k": (48, 19000, 1),
    "64 questions over 4k": (32, 4096, 64),
    "chunk 2048 over 8k": (2048, 8192, 1),
}


def compiled(fn: Any) -> list[Any]:
    """The kernels triton compiled for ``fn`` (its per-device caches; layout varies a little
    between triton versions, so this reads them defensively)."""
    found = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cache, dict):
            found.extend(k for k in cache.values() if hasattr(k, "n_regs"))
    return found


def describe(kernel: Any) -> dict[str, Any]:
    meta = kernel.metadata
    warps = getattr(meta, "num_warps", 4)
    shared = getattr(meta, "shared", 0)
    regs = kernel.n_regs
    by_regs = REGISTERS_PER_SM // max(1, regs * 32 * warps)
    by_shared = SHARED_PER_SM // shared if shared else 99
    src = getattr(kernel, "src", None)
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    shown = {}
    for key, value in (getattr(src, "constants", {}) or {}).items():
        # keys are argument names or tuples of argument indices, by triton version
        name = names[key[0]] if isinstance(key, tuple) and key and key[0] < len(names) else key
        if isinstance(value, (int, bool)) and str(name).isupper():
            shown[str(name)] = value
    return {"name": getattr(meta, "name", "?"), "constants": shown, "warps": warps,
            "stages": getattr(meta, "num_stages", None), "registers": regs,
            "spills": kernel.n_spills, "shared_bytes": shared,
            "programs_per_sm": min(by_regs, by_shared, MAX_WARPS_PER_SM // warps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="")
    args = p.parse_args()
    for q_len, ctx, seqs in SHAPES.values():
        inputs = paged_batch([q_len] * seqs, [ctx] * seqs)
        paged_prefill.paged_prefill_attention(*inputs, D**-0.5, None)
    q, k_cache, v_cache, meta = paged_batch([1] * 64, [4096] * 64)
    paged_decode.paged_decode_attention(q, k_cache, v_cache, meta, D**-0.5, None)
    torch.cuda.synchronize()
    rows = []
    for fn in (paged_prefill._prefill_kernel, paged_decode._decode_split_kernel,
               paged_decode._combine_splits_kernel):
        for kernel in compiled(fn):
            row = describe(kernel)
            rows.append(row)
            print(f"{row['name'][:40]:40s} warps {row['warps']} stages {row['stages']}  "
                  f"regs {row['registers']:3d} spills {row['spills']:4d} "
                  f"smem {row['shared_bytes'] // 1024:3d} KiB -> {row['programs_per_sm']} per SM"
                  f"  {row['constants']}", flush=True)
    if not rows:
        print("no compiled kernels found in triton's caches (its layout changed?)")
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
