"""Times each Triton kernel against the torch reference (and SDPA) at Llama-3.1-8B shapes.

Medians from triton.testing.do_bench (eager: small kernels are bound by the host's launch
cost there) and, for attention, do_bench_cudagraph (the GPU time a captured step pays; bytes
moved, bandwidth against the device-copy floor and TFLOP/s are computed from it). A split
sweep (graph times) shows how the chosen split count compares with the others. Needs CUDA.

    python perf/kernels_bench.py [--out FILE.json] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import livelm.daemon  # noqa: F401
except ImportError:  # run from a checkout that is not installed: map the folders by hand
    sys.path.insert(0, str(ROOT))
    import livelm

    livelm.__path__.append(str(ROOT))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from livelm.daemon.kernels import torch_ref  # noqa: E402
from livelm.daemon.kernels.attention_meta import AttentionMeta  # noqa: E402
from livelm.daemon.kernels.triton_backend import (  # noqa: E402
    norms,
    paged_decode,
    paged_prefill,
    rope,
    swiglu,
)

HQ, HK, D, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
HIDDEN, INTER = 4096, 14336
FLOOR_BYTES_PER_S = 4.2e12
DEV = torch.device("cuda")


def median_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


# ---- inputs ----------------------------------------------------------------------------------
def paged_batch(q_lens: list[int], ctx_lens: list[int], block: int = BLOCK):
    """Random q and a paged cache with blocks handed out in scrambled order."""
    per_seq = [math.ceil(c / block) for c in ctx_lens]
    num_blocks = sum(per_seq)
    k_cache = torch.randn(num_blocks, block, HK, D, device=DEV, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    table = torch.zeros(len(ctx_lens), max(per_seq), dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = order[used:used + n]
        used += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMeta(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=DEV),
        query_starts=torch.tensor(starts, dtype=torch.int32, device=DEV),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEV),
        block_tables=table,
        query_starts_list=starts,
        context_lens_list=list(ctx_lens),
        decode_only=all(n == 1 for n in q_lens),
    )
    q = torch.randn(starts[-1], HQ, D, device=DEV, dtype=DTYPE)
    return q, k_cache, v_cache, meta


def contiguous_kv(k_cache, v_cache, meta: AttentionMeta, b: int):
    """Sequence b's K/V gathered into [1, Hk, ctx, D] for SDPA (gather not timed)."""
    ctx = meta.context_lens_list[b]
    blocks = meta.block_tables[b, : math.ceil(ctx / BLOCK)].long()
    k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)[None].contiguous()
    v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)[None].contiguous()
    return k, v


def sdpa_fn(q, k_cache, v_cache, meta: AttentionMeta):
    """SDPA per sequence over pre-gathered contiguous K/V: an optimistic unpaged baseline."""
    parts = []
    for b in range(meta.num_seqs):
        lo, hi = meta.query_starts_list[b], meta.query_starts_list[b + 1]
        k, v = contiguous_kv(k_cache, v_cache, meta, b)
        ctx = meta.context_lens_list[b]
        qb = q[lo:hi].transpose(0, 1)[None]
        mask = None
        if hi - lo > 1:  # bottom-right aligned causal mask
            qp = torch.arange(ctx - (hi - lo), ctx, device=DEV)
            mask = torch.arange(ctx, device=DEV)[None, :] <= qp[:, None]
        parts.append((qb, k, v, mask))

    def run():
        return [F.scaled_dot_product_attention(qb, k, v, attn_mask=m, enable_gqa=True)
                for qb, k, v, m in parts]

    return run


# ---- cases -----------------------------------------------------------------------------------
def attention_case(name: str, q_lens: list[int], ctx_lens: list[int], decode: bool) -> dict:
    q, kc, vc, meta = paged_batch(q_lens, ctx_lens)
    scale = D**-0.5
    if decode:
        ours = lambda: paged_decode.paged_decode_attention(q, kc, vc, meta, scale, None)  # noqa: E731
    else:
        ours = lambda: paged_prefill.paged_prefill_attention(q, kc, vc, meta, scale, None)  # noqa: E731
    ref = lambda: torch_ref.paged_attention(q, kc, vc, meta, scale, None)  # noqa: E731
    err = ((ours().float() - ref().float()).norm() / ref().float().norm()).item()
    row = {"case": name, "triton_ms": median_ms(ours), "torch_ref_ms": median_ms(ref),
           "rel_err": err}
    try:
        row["sdpa_ms"] = median_ms(sdpa_fn(q, kc, vc, meta))
    except RuntimeError as exc:  # a backend SDPA picks can refuse a shape (PERFORMANCE.md)
        row["sdpa_error"] = str(exc).splitlines()[0]
    # rates from the graph time: small launches are host-bound when timed eagerly
    row["triton_graph_ms"] = t = graph_ms(ours)
    kv_bytes = sum(ctx_lens) * HK * D * 2 * q.element_size()
    row["bytes"] = kv_bytes + 2 * q.numel() * q.element_size()
    row["tb_per_s"] = row["bytes"] / (t * 1e-3) / 1e12
    row["x_floor"] = t / (row["bytes"] / FLOOR_BYTES_PER_S * 1e3)
    pairs = sum(n * c - n * (n - 1) / 2 for n, c in zip(q_lens, ctx_lens, strict=True))
    row["tflop_per_s"] = 4 * HQ * D * pairs / (t * 1e-3) / 1e12
    if decode:
        row["splits"] = paged_decode.choose_splits(meta.num_seqs * HK, max(ctx_lens), DEV)
    else:
        row["splits"] = paged_prefill._plan(q, kc, meta)["splits"]
    return row


def split_sweep(name: str, q_lens: list[int], ctx_lens: list[int], decode: bool) -> dict:
    q, kc, vc, meta = paged_batch(q_lens, ctx_lens)
    fn = paged_decode.paged_decode_attention if decode else paged_prefill.paged_prefill_attention
    times = {}
    for s in (1, 2, 4, 8, 16, 24, 32, 48, 64):
        times[s] = graph_ms(lambda s=s: fn(q, kc, vc, meta, D**-0.5, None, s))
    return {"case": name, "ms_by_splits": times}


def pointwise_cases(n: int) -> list[dict]:
    x = torch.randn(n, HIDDEN, device=DEV, dtype=DTYPE)
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, device=DEV, dtype=DTYPE)
    qkv = torch.randn(n, (HQ + 2 * HK) * D, device=DEV, dtype=DTYPE)
    q, k = qkv[:, : HQ * D].view(n, HQ, D), qkv[:, HQ * D : (HQ + HK) * D].view(n, HK, D)
    positions = torch.randint(0, 32768, (n,), device=DEV)
    table = torch.randn(32768, 2, D, device=DEV)
    gate_up = torch.randn(n, 2 * INTER, device=DEV, dtype=DTYPE)
    cases = {
        "rms_norm": (lambda: norms.rms_norm(x, w, 1e-5), lambda: torch_ref.rms_norm(x, w, 1e-5),
                     2 * x.numel() * 2),
        "add_rms_norm": (lambda: norms.add_rms_norm(x, res, w, 1e-5),
                         lambda: torch_ref.add_rms_norm(x, res, w, 1e-5), 4 * x.numel() * 2),
        "qk_rms_norm": (lambda: norms.rms_norm(q, w[:D], 1e-5),
                        lambda: torch_ref.rms_norm(q, w[:D], 1e-5), 2 * q.numel() * 2),
        "rope": (lambda: rope.rope(q, k, positions, table),
                 lambda: torch_ref.rope(q, k, positions, table), 4 * (q.numel() + k.numel())),
        "swiglu": (lambda: swiglu.swiglu(gate_up), lambda: torch_ref.swiglu(gate_up),
                   gate_up.numel() * 2 * 3 // 2),
    }
    rows = []
    for name, (ours, ref, nbytes) in cases.items():
        t = median_ms(ours)
        rows.append({"case": f"{name} n={n}", "triton_ms": t, "torch_ref_ms": median_ms(ref),
                     "bytes": nbytes, "tb_per_s": nbytes / (t * 1e-3) / 1e12})
    return rows


ATTENTION = [
    ("decode b=1 ctx=2.6k", [1], [2600], True),
    ("decode b=1 ctx=19k", [1], [19_000], True),
    ("decode b=1 ctx=32k", [1], [32_768], True),
    ("decode b=64 ctx=4k", [1] * 64, [4096] * 64, True),
    ("prefill q=32 ctx=2.6k", [32], [2600], False),
    ("prefill q=32 ctx=19k", [32], [19_000], False),
    ("prefill q=32 ctx=32k", [32], [32_768], False),
    ("prefill q=2048 ctx=8k", [2048], [8192], False),
]


def print_table(rows: list[dict]) -> None:
    cols = ["case", "triton_ms", "triton_graph_ms", "torch_ref_ms", "sdpa_ms", "splits",
            "tb_per_s", "x_floor", "tflop_per_s", "rel_err"]
    print("  ".join(f"{c:>15}" if i else f"{c:<24}" for i, c in enumerate(cols)))
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r.get(c, "")
            text = f"{v:.4f}" if isinstance(v, float) else str(v)
            cells.append(f"{text:>15}" if i else f"{text:<24}")
        print("  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-sweep", action="store_true", help="skip the split-count sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = [attention_case(*case) for case in ATTENTION]
    torch.cuda.empty_cache()
    rows += pointwise_cases(32) + pointwise_cases(2048)
    print_table(rows)
    sweeps = []
    if not args.no_sweep:
        for case in ATTENTION:
            if case[0] in ("decode b=1 ctx=19k", "decode b=64 ctx=4k", "prefill q=32 ctx=19k"):
                sweeps.append(split_sweep(*case))
                print(sweeps[-1]["case"], {k: round(v, 4) for k, v in
                                           sweeps[-1]["ms_by_splits"].items()})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rows": rows, "split_sweeps": sweeps}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
