"""How close the model's skinny GEMMs (M = 1..64 rows) come to streaming their weights at the
device's copy bandwidth: F.linear (cuBLAS) on Llama-3.1-8B's weight shapes, graph-replayed.
At data-chunk sizes (M in the thousands) the TFLOP/s column is the one that matters.

    python perf/gemm_bench.py --rows 1,8,32,64
    python perf/gemm_bench.py --rows 1024,1109,2048,4096,4224
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import measure_ceilings  # noqa: E402

# (name, out_features, in_features) of Llama-3.1-8B, per layer, and the LM head
SHAPES = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]


def graph_ms(fn, repeat: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def parse_rows(text: str) -> list[int]:
    rows: list[int] = []
    for part in text.split(","):
        if ":" in part:
            start, stop, step = (int(v) for v in part.split(":"))
            rows.extend(range(start, stop + 1, step))
        else:
            rows.append(int(part))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="1,8,32,64", help="M values, or START:STOP:STEP ranges")
    p.add_argument("--shapes", default="", help="comma-separated GEMM names (default: all)")
    p.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    device = torch.device("cuda")
    copy_bw = measure_ceilings(device).copy_bytes_per_s
    results = []
    names = set(args.shapes.split(",")) if args.shapes else {name for name, _, _ in SHAPES}
    for name, n, k in (shape for shape in SHAPES if shape[0] in names):
        # several weights so each call reads from HBM, not from L2 (50 MB)
        copies = max(2, int(200e6 // (n * k * 2)) + 1)
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        for m in parse_rows(args.rows):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ms = graph_ms(lambda x=x, ws=weights: [F.linear(x, w) for w in ws]) / copies
            floor = n * k * 2 / copy_bw * 1e3
            results.append(
                {
                    "gemm": name,
                    "blas": args.blas,
                    "m": m,
                    "ms": ms,
                    "floor_ms": floor,
                    "tb_per_s": n * k * 2 / ms / 1e9,
                    "tflops": 2 * m * n * k / ms / 1e9,
                }
            )
            print(
                f"{name:>8} M={m:4d}: {ms * 1e3:8.1f} us, {results[-1]['tb_per_s']:.2f} TB/s, "
                f"{ms / floor:.2f}x floor, {results[-1]['tflops']:.0f} TFLOP/s",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
