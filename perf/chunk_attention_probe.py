"""A long data chunk's attention: the bound Triton kernel (TMA, 64-token pages) against torch
SDPA's backends over the same K/V gathered into contiguous tensors, with the gather timed
apart. Tells whether gathering a long chunk's context and calling a dense kernel would beat
the paged kernel (the ingest's attention runs at about 400 TFLOP/s, NOTES.md).

    python perf/chunk_attention_probe.py --shapes 4096@6696,1109@7805 --out probe.json

A shape is QUERIES@CONTEXT, the context counting the queries (they are its last positions).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_bench import HK, HQ, D, graph_ms, median_ms, paged_batch  # noqa: E402

from livelm.daemon.kernels.torch_backend import _lower_right, gather  # noqa: E402
from livelm.daemon.kernels.triton_backend import paged_prefill  # noqa: E402

PAGE = 64
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def flop(q_len: int, ctx: int) -> float:
    pairs = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2
    return 4 * pairs * HQ * D


def probe(q_len: int, ctx: int) -> dict:
    q, k_cache, v_cache, meta = paged_batch([q_len], [ctx], PAGE)
    scale = D**-0.5
    ours = paged_prefill.paged_prefill_attention_tma(q, k_cache, v_cache, meta, scale, None)
    table = meta.block_tables[0]

    def gathered() -> tuple[torch.Tensor, torch.Tensor]:
        k = gather(k_cache, table, ctx).transpose(0, 1).unsqueeze(0).contiguous()
        v = gather(v_cache, table, ctx).transpose(0, 1).unsqueeze(0).contiguous()
        return k, v

    work = flop(q_len, ctx)
    us = 1e3 * graph_ms(lambda: paged_prefill.paged_prefill_attention_tma(
        q, k_cache, v_cache, meta, scale, None))
    eager = 1e3 * median_ms(lambda: paged_prefill.paged_prefill_attention_tma(
        q, k_cache, v_cache, meta, scale, None))
    row: dict = {"q": q_len, "context": ctx, "triton_tma_us": us, "triton_tma_eager_us": eager,
                 "triton_tflops": work / us / 1e6, "gather_us": 1e3 * graph_ms(gathered)}
    print(f"{q_len} queries over {ctx}: triton {us:.1f} us ({work / us / 1e6:.0f} TFLOP/s; "
          f"{eager:.1f} us eager), "
          f"gather of K and V {row['gather_us']:.1f} us", flush=True)
    k, v = gathered()
    q4 = q.transpose(0, 1).unsqueeze(0)
    positions = torch.arange(ctx - q_len, ctx, device=q.device)
    masks = {"lower_right": _lower_right(q_len, ctx),
             "bool": torch.arange(ctx, device=q.device)[None, :] <= positions[:, None]}
    for name, backend in BACKENDS.items():
        for (mask_name, mask), gqa in itertools.product(masks.items(), (True, False)):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(HQ // HK, 1),
                                         v.repeat_interleave(HQ // HK, 1))

            def sdpa(kk=kk, vv=vv, backend=backend, gqa=gqa, mask=mask) -> torch.Tensor:
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q4, kk, vv, attn_mask=mask,
                                                          scale=scale, enable_gqa=gqa)
            key = f"{name}_{mask_name}{'' if gqa else '_expanded'}"
            try:
                out = sdpa()[0].transpose(0, 1)
                t = 1e3 * median_ms(sdpa)  # eager: a failed capture would poison the rest
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                row[f"{key}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"    {key}: {row[f'{key}_error']}", flush=True)
                continue
            err = ((out.float() - ours.float()).norm() / ours.float().norm()).item()
            row[f"{key}_us"], row[f"{key}_rel_err"] = t, err
            print(f"    {key}: {t:.1f} us ({work / t / 1e6:.0f} TFLOP/s), rel diff {err:.2e}",
                  flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="4096@6696,1109@7805,2048@8192")
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = []
    for item in args.shapes.split(","):
        q_len, _, ctx = item.partition("@")
        rows.append(probe(int(q_len), int(ctx)))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
