"""Where a query's time goes: GPU time of the captured steps (CUDA events around graph
replays) against the end-to-end latencies the streaming benchmark reports.

    python perf/step_profile.py --model random:llama-3.1-8b --contexts 3000,19000,32000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemm_overrides  # noqa: E402
from floor import forward_floor_ms, measure_ceilings  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.batch import build_batch  # noqa: E402
from livelm.daemon.engine.block_pool import BlockPool  # noqa: E402
from livelm.daemon.engine.graphs import StepGraphs  # noqa: E402
from livelm.daemon.engine.kv_cache import KVCache  # noqa: E402
from livelm.daemon.engine.scheduler import Chunk  # noqa: E402
from livelm.daemon.engine.sequence import Sequence  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.daemon.kernels.triton_backend import paged_decode, pdl  # noqa: E402

RECORD_TOKENS = 51  # one OHLCV record of the stream bench (the demo tokenizer's count)


def held_sequence(pool: BlockPool, tokens: int, block: int) -> Sequence:
    """A sequence of ``tokens`` tokens with the blocks to hold them (release them after)."""
    seq = Sequence(tokens=[1] * tokens)
    seq.block_table = pool.allocate(-(-tokens // block))
    return seq


def replay_ms(graphs: StepGraphs, chunk: Chunk | None, shape: tuple[int, int], repeat: int = 30,
              chunks: list[Chunk] | None = None, logits: bool = True) -> float:
    """Median GPU time of the step's graph (``logits`` False: the session-data variant)."""
    run = graphs.run if logits else graphs.run_without_logits
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(chunks or [chunk], shape)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_breakdown(
    graphs: StepGraphs, chunks: list[Chunk], shape: tuple[int, int], repeat: int = 5,
    logits: bool = True,
) -> list[dict]:
    """GPU time per kernel name over ``repeat`` replays (torch.profiler sees inside graphs).
    With PDL on, a kernel's time includes its wait for the one before: use --no-pdl here."""
    run = graphs.run if logits else graphs.run_without_logits
    return profiled(lambda: run(chunks, shape), repeat)


def eager_breakdown(decoder, cache: KVCache, chunks: list[Chunk], repeat: int = 3) -> list[dict]:
    """``kernel_breakdown`` of an eager step."""
    batch = build_batch(chunks, cache.block_size, decoder.device)
    return profiled(lambda: decoder(batch.input_ids, batch.positions, batch.meta, cache.layers),
                    repeat)


def profiled(step: Callable[[], object], repeat: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            step()
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


def eager_ms(decoder, cache: KVCache, chunks: list[Chunk], repeat: int = 5) -> float:
    """GPU-side time of one eager step (a batch no graph holds), CUDA events around it."""
    times = []
    for _ in range(repeat + 1):
        batch = build_batch(chunks, cache.block_size, decoder.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decoder(batch.input_ids, batch.positions, batch.meta, cache.layers)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def parse_chunks(spec: str) -> list[tuple[int, int]]:
    """"4096@2600,1109@6700" -> [(4096, 2600), (1109, 6700)]: tokens at a context."""
    chunks = []
    for item in filter(None, spec.split(",")):
        tokens, _, context = item.partition("@")
        chunks.append((int(tokens), int(context or 0)))
    return chunks


def data_chunks(decoder, cache: KVCache, pool: BlockPool, chunks: list[tuple[int, int]],
                kernels: bool) -> list[dict]:
    """GPU time of session-data chunks as the ingest steps them (eager, no logits)."""
    rows = []
    for tokens, context in chunks:
        seq = held_sequence(pool, context + tokens, cache.block_size)
        chunk = [Chunk(seq, context, tokens, False)]
        with torch.inference_mode():
            ms = eager_ms(decoder, cache, chunk)
            row = {"chunk_tokens": tokens, "context": context, "chunk_gpu_ms": ms,
                   "tokens_per_s": tokens / ms * 1e3}
            print(f"data chunk of {tokens} tokens over {context}: {ms:.2f} ms "
                  f"({row['tokens_per_s']:.0f} tokens/s)", flush=True)
            if kernels:
                print(f"data chunk of {tokens} tokens over {context}, by kernel:")
                row["chunk_kernels"] = eager_breakdown(decoder, cache, chunk)
        pool.release(seq.block_table)
        rows.append(row)
    return rows


def many_sessions(graphs: StepGraphs, decoder, cache: KVCache, pool: BlockPool,
                  sessions: int, context: int, kernels: bool = False) -> dict:
    """The 64-sessions workload's two steps: every session's 32-token question prefilled in
    one eager step, then one decode token for each (a captured graph)."""
    block = cache.block_size
    seqs = [held_sequence(pool, context + 33, block) for _ in range(sessions)]
    with torch.inference_mode():
        prefill = eager_ms(decoder, cache, [Chunk(s, context, 32, True) for s in seqs])
        prefill_breakdown = None
        if kernels:
            print(f"{sessions} sessions x {context}, 32-token questions prefill, by kernel:")
            prefill_breakdown = eager_breakdown(decoder, cache,
                                                [Chunk(s, context, 32, True) for s in seqs])
    decode_chunks = [Chunk(s, context + 32, 1, True) for s in seqs]
    decode = replay_ms(graphs, None, (sessions, 1), chunks=decode_chunks)
    breakdown = None
    if kernels:
        print(f"{sessions} sessions x {context}, decode step, by kernel:")
        breakdown = kernel_breakdown(graphs, decode_chunks, (sessions, 1))
    for seq in seqs:
        pool.release(seq.block_table)
    row = {"sessions": sessions, "context": context, "question_prefill_gpu_ms": prefill,
           "decode_gpu_ms": decode, "decode_kernels": breakdown,
           "prefill_kernels": prefill_breakdown}
    print(f"{sessions} sessions x {context}: 32-token questions prefill {prefill:.2f} ms (eager), "
          f"decode step {decode:.2f} ms", flush=True)
    return row


def decode_batches(graphs: StepGraphs, pool: BlockPool, block: int, batches: list[int],
                   context: int) -> list[dict]:
    """GPU time of the captured decode step at several batch sizes, every sequence at
    ``context`` keys. (Graphs of several sequences are captured without PDL since these
    figures showed it costing there; --no-pdl now changes only the one-sequence graphs.)"""
    rows = []
    for batch in batches:
        seqs = [held_sequence(pool, context + 1, block) for _ in range(batch)]
        shape = next((b, 1) for b in graphs.decode_sizes if b >= batch)
        ms = replay_ms(graphs, None, shape, chunks=[Chunk(s, context, 1, True) for s in seqs])
        for seq in seqs:
            pool.release(seq.block_table)
        rows.append({"decode_batch": batch, "context": context, "decode_gpu_ms": ms})
        print(f"decode batch {batch} x {context}: {ms:.3f} ms", flush=True)
    return rows


def _fix_decode_splits(splits: int, num_kv_heads: int) -> None:
    """One sequence's decode attention takes ``splits`` key splits (A/B of the split rule;
    a captured graph keeps the count chosen at capture)."""
    rule = paged_decode.choose_splits

    def fixed(programs: int, max_context: int, device: torch.device,
              per_sm: int = paged_decode.PROGRAMS_PER_SM) -> int:
        if programs == num_kv_heads:
            return splits
        return rule(programs, max_context, device, per_sm)

    paged_decode.choose_splits = fixed


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--contexts", default="3000,19000,32000")
    p.add_argument("--out", default="")
    p.add_argument("--kernels", action="store_true", help="also print GPU time per kernel")
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--sessions", type=int, default=64,
                   help="also time the many-sessions steps (0 = skip)")
    p.add_argument("--session-context", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=Config().block_size, help="tokens per KV block")
    p.add_argument("--decode-batches", default="",
                   help="also time the decode step at these batch sizes (session context)")
    p.add_argument("--gemm-configs", default="",
                   help="a skinny_gemm_bench.py results file: its best configs replace the "
                   "skinny GEMM's default rule (A/B)")
    p.add_argument("--gemm-configs-rows", type=int, default=1,
                   help="apply --gemm-configs from this many rows up")
    p.add_argument("--gemm-configs-max-rows", type=int, default=None,
                   help="and up to this many rows (default: no limit)")
    p.add_argument("--swiglu-configs", default="",
                   help="likewise for the SwiGLU-fused down projection (its down_swiglu rows), "
                   "within the same row limits")
    p.add_argument("--chunks", default="",
                   help="also time session-data chunks, TOKENS@CONTEXT,... (eager, as ingested)")
    p.add_argument("--decode-splits", type=int, default=0,
                   help="key splits of the one-sequence decode graph (default: its rule's)")
    p.add_argument("--no-pdl", action="store_true",
                   help="launch our Triton kernels without programmatic dependent launch")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    pdl.set_enabled(not args.no_pdl)
    if args.gemm_configs:
        gemm_overrides.install(gemm_overrides.load_table(Path(args.gemm_configs)),
                               args.gemm_configs_rows, args.gemm_configs_max_rows)
    if args.swiglu_configs:
        table = gemm_overrides.load_table(Path(args.swiglu_configs), fused=True)
        gemm_overrides.install(table, args.gemm_configs_rows, args.gemm_configs_max_rows,
                               fused=True)
    config = Config(model=args.model, device="cuda", dtype="bfloat16",
                    kernel_policy=args.kernel_policy, block_size=args.block_size)
    ceilings = measure_ceilings(config.torch_device())
    _, model = bind_and_load(config, progress=False)
    if args.decode_splits:
        _fix_decode_splits(args.decode_splits, model.config.num_kv_heads)
    block = args.block_size
    chunks = parse_chunks(args.chunks)
    longest = max(contexts, default=args.session_context)
    held = max([longest, *(t + c for t, c in chunks)])  # the KV the longest sequence holds
    blocks = held // block + 64 + args.sessions * (args.session_context // block + 4)
    cache = KVCache(model.config, blocks, block, config.torch_dtype(), config.torch_device())
    for k, v in cache.layers:  # random KV: never time on zeros
        k.normal_()
        v.normal_()
    pool = BlockPool(blocks)
    graphs = StepGraphs(model.decoder, cache, longest + 256, max(1, args.sessions),
                        config.graph_max_question)
    graphs.capture(progress=False)
    rows = []
    for ctx in contexts:
        seq = held_sequence(pool, ctx + RECORD_TOKENS, block)
        question = replay_ms(graphs, Chunk(seq, ctx, 32, True), (1, 32))
        decode = replay_ms(graphs, Chunk(seq, ctx, 1, True), (1, 1))
        # a pushed record's data step (push -> queryable), in the graph the engine replays
        record = Chunk(seq, ctx, RECORD_TOKENS, False)
        record_shape = graphs.shape_for([record])
        data = replay_ms(graphs, record, record_shape, logits=False)
        data_logits = replay_ms(graphs, record, record_shape)  # as before the no-logits graphs
        row = {"context": ctx, "question_32_gpu_ms": question, "decode_gpu_ms": decode,
               f"data_{RECORD_TOKENS}_gpu_ms": data,
               f"data_{RECORD_TOKENS}_with_logits_gpu_ms": data_logits,
               "pdl": pdl.enabled_on(config.torch_device()),
               "floor_ms": forward_floor_ms(model.config, ceilings, ctx, 32)}
        if args.kernels:
            print(f"context {ctx}, 32-token question step, by kernel:")
            row["question_kernels"] = kernel_breakdown(graphs, [Chunk(seq, ctx, 32, True)], (1, 32))
            print(f"context {ctx}, decode step, by kernel:")
            row["decode_kernels"] = kernel_breakdown(graphs, [Chunk(seq, ctx, 1, True)], (1, 1))
            print(f"context {ctx}, {RECORD_TOKENS}-token data step, by kernel:")
            row["data_kernels"] = kernel_breakdown(graphs, [record], record_shape, logits=False)
        pool.release(seq.block_table)
        rows.append(row)
        print(f"context {ctx} (PDL {'on' if pdl.enabled_on(config.torch_device()) else 'off'}): "
              f"32-token question step {question:.2f} ms, decode step {decode:.2f} ms, "
              f"{RECORD_TOKENS}-token data step {data:.2f} ms ({data_logits:.2f} with logits), "
              f"floor {rows[-1]['floor_ms']:.2f} ms", flush=True)
    if args.sessions:
        rows.append(many_sessions(graphs, model.decoder, cache, pool, args.sessions,
                                  args.session_context, args.kernels))
    if chunks:
        rows += data_chunks(model.decoder, cache, pool, chunks, args.kernels)
    if args.decode_batches:
        rows += decode_batches(graphs, pool, block, [int(b) for b in args.decode_batches.split(",")],
                               args.session_context)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
