"""Host time of an eager step (a data chunk no captured graph holds): wall time per step
against its GPU time, then cProfile over a few steps, by own time and by cumulative time.
Eager steps of a few hundred tokens measured host-bound in the daemon (a 404-token step
16-31 ms of GPU span with about 11 ms of kernels; a 1-token eager step 32 ms).

    python perf/eager_host_profile.py --chunks 1@2600,404@2600 [--out FILE.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import held_sequence, parse_chunks  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.batch import build_batch  # noqa: E402
from livelm.daemon.engine.block_pool import BlockPool  # noqa: E402
from livelm.daemon.engine.kv_cache import KVCache  # noqa: E402
from livelm.daemon.engine.scheduler import Chunk  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402


def step_times(decoder, cache: KVCache, chunk: list[Chunk], repeat: int) -> dict[str, float]:
    """Median host wall time of launching one step (no sync inside), and of the step to its
    end (synchronized), and its GPU time by events."""
    launch, wall, gpu = [], [], []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        batch = build_batch(chunk, cache.block_size, decoder.device)
        start.record()
        decoder(batch.input_ids, batch.positions, batch.meta, cache.layers)
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        gpu.append(start.elapsed_time(end))
    return {"launch_ms": statistics.median(launch), "wall_ms": statistics.median(wall),
            "gpu_ms": statistics.median(gpu)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--chunks", default="1@2600,404@2600")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="")
    args = p.parse_args()
    config = Config(model=args.model, device="cuda", dtype="bfloat16",
                    kernel_policy=args.kernel_policy)
    _, model = bind_and_load(config, progress=False)
    chunks = parse_chunks(args.chunks)
    block = config.block_size
    blocks = max(t + c for t, c in chunks) // block + 8
    cache = KVCache(model.config, blocks, block, config.torch_dtype(), config.torch_device())
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    pool = BlockPool(blocks)
    rows = []
    with torch.inference_mode():
        for tokens, context in chunks:
            seq = held_sequence(pool, context + tokens, block)
            chunk = [Chunk(seq, context, tokens, False)]
            times = step_times(model.decoder, cache, chunk, args.repeat)
            print(f"{tokens} tokens over {context}: launch {times['launch_ms']:.2f} ms on the "
                  f"host, {times['wall_ms']:.2f} ms to the end, GPU {times['gpu_ms']:.2f} ms",
                  flush=True)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(3):
                batch = build_batch(chunk, block, model.decoder.device)
                model.decoder(batch.input_ids, batch.positions, batch.meta, cache.layers)
            prof.disable()
            torch.cuda.synchronize()
            for key in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats(key).print_stats(25)
                print(text.getvalue(), flush=True)
            rows.append({"tokens": tokens, "context": context, **times})
            pool.release(seq.block_table)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
