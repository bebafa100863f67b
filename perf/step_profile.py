"""Where a query's time goes: GPU time of the captured steps (CUDA events around graph
replays) against the end-to-end latencies the streaming benchmark reports.

    python perf/step_profile.py --model random:llama-3.1-8b --contexts 3000,19000,32000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import forward_floor_ms, measure_ceilings  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.block_pool import BlockPool  # noqa: E402
from livelm.daemon.engine.graphs import StepGraphs  # noqa: E402
from livelm.daemon.engine.kv_cache import KVCache  # noqa: E402
from livelm.daemon.engine.scheduler import Chunk  # noqa: E402
from livelm.daemon.engine.sequence import Sequence  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402


def replay_ms(graphs: StepGraphs, chunk: Chunk, shape: tuple[int, int], repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs.run([chunk], shape)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_breakdown(
    graphs: StepGraphs, chunk: Chunk, shape: tuple[int, int], repeat: int = 5
) -> list[dict]:
    """GPU time per kernel name over ``repeat`` replays (torch.profiler sees inside graphs)."""
    from torch.profiler import ProfilerActivity, profile

    graphs.run([chunk], shape)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            graphs.run([chunk], shape)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        stats = totals.setdefault(event.name[:90], [0.0, 0])
        stats[0] += event.device_time / 1e3 / repeat  # ms per step
        stats[1] += 1
    rows = [{"kernel": k, "ms_per_step": v[0], "calls_per_step": v[1] / repeat}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    for row in rows[:25]:
        print(f"    {row['ms_per_step']:7.3f} ms  x{row['calls_per_step']:5.0f}  {row['kernel']}")
    print(f"    total kernel time {sum(r['ms_per_step'] for r in rows):.3f} ms/step", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--contexts", default="3000,19000,32000")
    p.add_argument("--out", default="")
    p.add_argument("--kernels", action="store_true", help="also print GPU time per kernel")
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    config = Config(model=args.model, device="cuda", dtype="bfloat16",
                    kernel_policy=args.kernel_policy)
    ceilings = measure_ceilings(config.torch_device())
    _, model = bind_and_load(config, progress=False)
    block = 16
    blocks = max(contexts) // block + 64
    cache = KVCache(model.config, blocks, block, config.torch_dtype(), config.torch_device())
    for k, v in cache.layers:  # random KV: never time on zeros
        k.normal_()
        v.normal_()
    pool = BlockPool(blocks)
    graphs = StepGraphs(model.decoder, cache, max(contexts) + 256, 1, 32)
    graphs.capture(progress=False)
    rows = []
    for ctx in contexts:
        seq = Sequence(tokens=[1] * (ctx + 32))
        seq.block_table = pool.allocate(-(-(ctx + 32) // block))
        question = replay_ms(graphs, Chunk(seq, ctx, 32, True), (1, 32))
        decode = replay_ms(graphs, Chunk(seq, ctx, 1, True), (1, 1))
        row = {"context": ctx, "question_32_gpu_ms": question, "decode_gpu_ms": decode,
               "floor_ms": forward_floor_ms(model.config, ceilings, ctx, 32)}
        if args.kernels:
            print(f"context {ctx}, 32-token question step, by kernel:")
            row["question_kernels"] = kernel_breakdown(graphs, Chunk(seq, ctx, 32, True), (1, 32))
            print(f"context {ctx}, decode step, by kernel:")
            row["decode_kernels"] = kernel_breakdown(graphs, Chunk(seq, ctx, 1, True), (1, 1))
        pool.release(seq.block_table)
        rows.append(row)
        print(f"context {ctx}: 32-token question step {question:.2f} ms, decode step {decode:.2f} ms, "
              f"floor {rows[-1]['floor_ms']:.2f} ms", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
