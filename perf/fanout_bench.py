"""Push-to-queryable latency when many sessions take data at once: a market feed with many
symbols, one session per symbol, every symbol ticking in the same instant.

Each of N sessions is first filled to about C tokens (one session at a time, untimed). Then
each round pushes R fresh OHLCV records to every session concurrently (one ``Engine.push``
per session, gathered) and is timed from just before the pushes to the moment the last
session has all of them in its KV (queryable). Three untimed rounds come first. Per round it
also keeps how the worker's steps ran: the deltas of ``ModelRunner.graph_steps`` (replayed a
captured CUDA graph) and ``ModelRunner.eager_steps`` (ran eagerly). Prints one table (round ms
p50 / p90 / p99 / max, mean steps per round by kind, tokens/s over the rounds); with --out,
writes the rounds and the summary as JSON.

    python perf/fanout_bench.py --sessions 64 --context 4096 [--out perf/results]
    python perf/fanout_bench.py --sessions 64 --context 4096 --graph-max-data-seqs 0  # A/B:
        # no packed graphs (steps of several sessions' data run eagerly)

    python perf/fanout_bench.py --device cpu --sessions 4 --context 200 --rounds 3  # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_meta  # noqa: E402
from stream_bench import Bench, pct, record, start_bench  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.daemon.model.loader import LoadedModel  # noqa: E402

WARM_UP_ROUNDS = 3
RECORD_TOKENS = 64  # a generous bound on one record's tokens, for sizing the KV pool
PACKED_SEQS = 64  # the sessions one packed data graph may hold, unless --graph-max-data-seqs


def kv_tokens_needed(args: argparse.Namespace, block_size: int) -> int:
    """A pool for every session's filled context, all the rounds' records and a margin."""
    rounds = args.rounds + WARM_UP_ROUNDS
    per_session = args.context + rounds * args.records * RECORD_TOKENS + 4 * block_size
    return args.sessions * per_session + 16 * 1024


async def fill_sessions(bench: Bench, args: argparse.Namespace) -> list[str]:
    """Opens one session per symbol and fills each to about args.context tokens, in turn."""
    sids = []
    for i in range(args.sessions):
        sid = await bench.open(f"Session {i} watches the feed of symbol S{i:04d}.")
        await bench.fill(sid, args.context, batch=128)
        sids.append(sid)
    return sids


def context_tokens(bench: Bench, sids: list[str]) -> int:
    return sum(bench.engine.sessions[sid].context_tokens for sid in sids)


def step_counts(engine: Engine) -> tuple[int, int]:
    """(graph, eager) steps the runner has taken so far."""
    runner = engine.worker.runner
    return runner.graph_steps, runner.eager_steps


async def push_and_wait(bench: Bench, sid: str, rows: list[dict[str, Any]], start: float) -> float:
    """Pushes ``rows`` to one session; ms from ``start`` until it has them all in its KV."""
    await bench.engine.push(sid, rows)
    await bench.wait_ingested(sid)
    return (time.perf_counter() - start) * 1e3


async def one_round(bench: Bench, sids: list[str], records: int) -> dict[str, Any]:
    """Pushes ``records`` fresh records to every session at once; the round's wall time (to the
    last session queryable), its tokens and the runner steps it took."""
    batches = []
    for _ in sids:
        batches.append([record(bench.next_record + j) for j in range(records)])
        bench.next_record += records
    tokens_before = context_tokens(bench, sids)
    graph_before, eager_before = step_counts(bench.engine)
    start = time.perf_counter()
    queryable = await asyncio.gather(
        *(push_and_wait(bench, sid, rows, start) for sid, rows in zip(sids, batches, strict=True))
    )
    ms = (time.perf_counter() - start) * 1e3
    graph_after, eager_after = step_counts(bench.engine)
    return {"ms": ms, "tokens": context_tokens(bench, sids) - tokens_before,
            "graph_steps": graph_after - graph_before, "eager_steps": eager_after - eager_before,
            "first_queryable_ms": min(queryable),
            "median_queryable_ms": statistics.median(queryable)}


async def scenario(model: LoadedModel, config: Config, args: argparse.Namespace) -> dict[str, Any]:
    bench = start_bench(model, config)
    engine = bench.engine
    try:
        fill_start = time.perf_counter()
        sids = await fill_sessions(bench, args)
        contexts = [engine.sessions[sid].context_tokens for sid in sids]
        print(f"filled {len(sids)} sessions to {statistics.mean(contexts):.0f} tokens "
              f"in {time.perf_counter() - fill_start:.1f} s", flush=True)
        for _ in range(WARM_UP_ROUNDS):
            await one_round(bench, sids, args.records)
        rounds = [await one_round(bench, sids, args.records) for _ in range(args.rounds)]
    finally:
        await engine.stop(5.0)
    return {"context_tokens": round(statistics.mean(contexts)), "rounds": rounds}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [r["ms"] for r in rounds]
    tokens = sum(r["tokens"] for r in rounds)
    return {
        "round_ms": {"p50": pct(ms, 0.5), "p90": pct(ms, 0.9), "p99": pct(ms, 0.99),
                     "max": max(ms), "mean": statistics.mean(ms)},
        "tokens_per_round": tokens / len(rounds),
        "graph_steps_per_round": statistics.mean(r["graph_steps"] for r in rounds),
        "eager_steps_per_round": statistics.mean(r["eager_steps"] for r in rounds),
        "tokens_per_s": tokens / (sum(ms) / 1e3),
    }


def table(args: argparse.Namespace, context: int, summary: dict[str, Any]) -> str:
    ms = summary["round_ms"]
    rows = [
        ("sessions", "context", "records/round", "tokens/round", "p50 ms", "p90 ms", "p99 ms",
         "max ms", "steps/round graph", "steps/round eager", "tokens/s"),
        (str(args.sessions), str(context), str(args.records),
         f"{summary['tokens_per_round']:.0f}", f"{ms['p50']:.2f}", f"{ms['p90']:.2f}",
         f"{ms['p99']:.2f}", f"{ms['max']:.2f}", f"{summary['graph_steps_per_round']:.2f}",
         f"{summary['eager_steps_per_round']:.2f}", f"{summary['tokens_per_s']:.0f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--device", default="cuda",
                   help="cpu: the host side only, with the demo model (a smoke run)")
    p.add_argument("--sessions", type=int, default=64, help="sessions (symbols) fed at once")
    p.add_argument("--context", type=int, default=4096,
                   help="tokens each session is filled to before the timed rounds")
    p.add_argument("--records", type=int, default=1, help="records pushed to each session a round")
    p.add_argument("--rounds", type=int, default=50, help="timed rounds")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--graph-max-data-seqs", type=int, default=PACKED_SEQS,
                   help="the most sessions whose data one captured step may hold (0 = none: "
                   "steps of several sessions' data run eagerly)")
    p.add_argument("--kv-cache-tokens", type=int, default=0,
                   help="KV pool tokens (0: sessions x (context + the rounds' records) + margin)")
    p.add_argument("--cache-dir", default=os.environ.get("LIVELM_HOME", "/tmp/livelm-cache"))
    p.add_argument("--out", default="", help="a folder for the JSON (none: print only)")
    return p.parse_args()


def build_config(args: argparse.Namespace) -> Config:
    cuda = args.device != "cpu"
    block_size = Config().block_size
    return Config(model=args.model if cuda else "demo", device=args.device,
                  dtype="bfloat16" if cuda else "float32", cache_dir=args.cache_dir,
                  kv_cache_tokens=args.kv_cache_tokens or kv_tokens_needed(args, block_size),
                  max_batch_tokens=args.max_batch_tokens,
                  kernel_policy=args.kernel_policy if cuda else "",
                  graph_max_data_seqs=args.graph_max_data_seqs)


def device_name(config: Config) -> str:
    device = config.torch_device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> int:
    args = parse_args()
    config = build_config(args)
    _, model = bind_and_load(config)
    run = uvloop.run(scenario(model, config, args))
    summary = summarize(run["rounds"])
    meta = {
        "commit": run_meta.commit(),
        "gpu": device_name(config), "torch": torch.__version__,
        "python": platform.python_version(), "model": config.model, "dtype": config.dtype,
        "date": time.strftime("%Y-%m-%d"), "kv_cache_tokens": config.kv_cache_tokens,
        "graph_max_data_seqs": config.graph_max_data_seqs,
    }
    print(table(args, run["context_tokens"], summary))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = meta["gpu"].replace(" ", "-").lower()
        path = out / f"{meta['date']}-{gpu}-fanout.json"
        results = {"args": vars(args), "context_tokens": run["context_tokens"],
                   "rounds": run["rounds"], "summary": summary, "meta": meta}
        path.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
