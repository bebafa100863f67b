"""A/B of the skinny GEMM's weight prefetch before the PDL wait, and of PDL for graphs of
several sequences, on the captured steps (graph-replayed GPU time, variants alternated in
one process over the same KV):

- ``prefetch``: as the engine runs (prefetch on; PDL for one-sequence graphs only);
- ``no_prefetch``: the prefetch switched off;
- ``pdl_all``: prefetch on, and graphs of several sequences captured with PDL as well.

    python perf/prefetch_ab.py --contexts 3000,19000,34000 --out ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import RECORD_TOKENS, held_sequence, replay_ms  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine import graphs as graphs_module  # noqa: E402
from livelm.daemon.engine.block_pool import BlockPool  # noqa: E402
from livelm.daemon.engine.graphs import StepGraphs  # noqa: E402
from livelm.daemon.engine.kv_cache import KVCache  # noqa: E402
from livelm.daemon.engine.scheduler import Chunk  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.daemon.kernels.triton_backend import skinny_gemm  # noqa: E402

VARIANTS = ("prefetch", "no_prefetch", "pdl_all")


def capture(variant: str, decoder, cache: KVCache, max_context: int, max_batch: int,
            max_question: int) -> StepGraphs:
    """The step graphs as ``variant`` would run them (the switches matter only while capturing)."""
    graphs = StepGraphs(decoder, cache, max_context, max_batch, max_question)
    original = graphs_module._launch_mode
    skinny_gemm.set_weight_prefetch(variant != "no_prefetch")
    if variant == "pdl_all":
        graphs_module._launch_mode = lambda shape: contextlib.nullcontext()
    try:
        graphs.capture(progress=False)
    finally:
        graphs_module._launch_mode = original
        skinny_gemm.set_weight_prefetch(True)
    return graphs


def alternated(measure: Callable[[StepGraphs], float], variants: dict[str, StepGraphs],
               rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each variant's time, the variants taking turns."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, graphs in variants.items():
            times[name].append(measure(graphs))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--contexts", default="3000,19000,34000")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--session-context", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--out", default="")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    config = Config(model=args.model, device="cuda", dtype="bfloat16",
                    kernel_policy=args.kernel_policy)
    _, model = bind_and_load(config, progress=False)
    block = config.block_size
    longest = max(contexts)
    blocks = longest // block + 64 + args.sessions * (args.session_context // block + 4)
    cache = KVCache(model.config, blocks, block, config.torch_dtype(), config.torch_device())
    for k, v in cache.layers:  # random KV: never time on zeros
        k.normal_()
        v.normal_()
    pool = BlockPool(blocks)
    variants = {name: capture(name, model.decoder, cache, longest + 256, args.sessions,
                              config.graph_max_question) for name in VARIANTS}
    rows = []

    def record(label: str, ms: dict[str, float]) -> None:
        rows.append({"step": label, **ms})
        print(f"{label:28s} " + "  ".join(f"{n} {t:.3f}" for n, t in ms.items()), flush=True)

    for ctx in contexts:
        seq = held_sequence(pool, ctx + RECORD_TOKENS, block)
        question, decode = Chunk(seq, ctx, 32, True), Chunk(seq, ctx, 1, True)
        data = Chunk(seq, ctx, RECORD_TOKENS, False)
        data_shape = variants["prefetch"].shape_for([data])
        record(f"question 32 @ {ctx}", alternated(
            lambda g, c=question: replay_ms(g, c, (1, 32), repeat=20), variants, args.rounds))
        record(f"decode @ {ctx}", alternated(
            lambda g, c=decode: replay_ms(g, c, (1, 1), repeat=20), variants, args.rounds))
        record(f"data {RECORD_TOKENS} @ {ctx}", alternated(
            lambda g, c=data, sh=data_shape: replay_ms(g, c, sh, repeat=20, logits=False), variants,
            args.rounds))
        pool.release(seq.block_table)
    for batch in (8, args.sessions):
        seqs = [held_sequence(pool, args.session_context + 33, block) for _ in range(batch)]
        chunks = [Chunk(s, args.session_context + 32, 1, True) for s in seqs]
        shape = next((b, 1) for b in variants["prefetch"].decode_sizes if b >= batch)
        record(f"decode {batch} x {args.session_context}", alternated(
            lambda g, cs=chunks, sh=shape: replay_ms(g, None, sh, repeat=20, chunks=cs),
            variants, args.rounds))
        for seq in seqs:
            pool.release(seq.block_table)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
