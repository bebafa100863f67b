"""The residual add + RMSNorm folded into a one-row projection (``add_rms_norm_linear``)
against the norm kernel followed by the skinny GEMM, on Llama-3.1-8B's qkv and gate/up
projections at M = 1, bf16: per-call µs in captured graphs (``skinny_gemm_bench.graph_us``,
weights cycled past the L2), for the default tiles and for CUDA-core (one-row) tiles.

    python perf/norm_linear_bench.py [--out perf/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from skinny_gemm_bench import L2_DEFEAT_BYTES, graph_us  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("gate_up", 28672, 4096)]
FMA = [(32, 256, 1), (32, 256, 2), (16, 512, 1), (64, 256, 2)]  # (BLOCK_N, BLOCK_K, splits)


def _variants(n: int, k: int) -> dict[str, Callable[[int], object]]:
    """Calls by label for one projection [n, k]; call(i) uses the i-th weight copy."""
    from livelm.daemon.kernels.triton_backend import norm_linear, norms
    from livelm.daemon.kernels.triton_backend import skinny_gemm as sg

    dev, dt = torch.device("cuda"), torch.bfloat16
    copies = max(1, int(L2_DEFEAT_BYTES // (n * k * 2)) + 1)
    ws = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(copies)]
    x, res = torch.randn(1, k, device=dev, dtype=dt), torch.randn(1, k, device=dev, dtype=dt)
    gamma = torch.randn(k, device=dev, dtype=dt)
    normed = norms.add_rms_norm(x, res, gamma, 1e-5)[0]

    def w(i: int) -> torch.Tensor:
        return ws[i % len(ws)]

    variants: dict[str, Callable[[int], object]] = {
        "norm kernel": lambda i: norms.add_rms_norm(x, res, gamma, 1e-5),
        "linear": lambda i: sg.skinny_linear(normed, w(i)),
        "norm + linear": lambda i: sg.skinny_linear(
            norms.add_rms_norm(x, res, gamma, 1e-5)[0], w(i)),
        "fused": lambda i: norm_linear.add_rms_norm_linear(x, res, gamma, 1e-5, w(i)),
    }
    for bn, bk, split in FMA:
        cfg = sg.SkinnyConfig(1, bn, bk, split, num_warps=4, num_stages=3)
        tag = f"m1 n{bn} k{bk} s{split}"
        variants[f"linear {tag}"] = lambda i, c=cfg: sg.skinny_linear(normed, w(i), c)
        variants[f"fused {tag}"] = lambda i, c=cfg: norm_linear.add_rms_norm_linear(
            x, res, gamma, 1e-5, w(i), c)
    return variants


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="perf/results")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=9)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("norm_linear_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for name, n, k in SHAPES:
        floor_us = n * k * 2 / 4.2e6
        for label, call in _variants(n, k).items():
            try:
                us = graph_us(call, args.calls, args.replays)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile: noted
                rows.append({"shape": name, "variant": label, "error": str(exc)[:200]})
                print(f"{name:8s} {label:28s} error {exc}", flush=True)
                continue
            rows.append({"shape": name, "variant": label, "us": us, "floor_us": floor_us})
            print(f"{name:8s} {label:28s} {us:7.2f} us ({us / floor_us:.2f}x floor)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "norm-linear-bench.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
