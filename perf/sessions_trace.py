"""A timeline of the worker while many sessions ask at once (stream_bench's 64-session round).

Wraps the worker's methods with timers (this script only; the engine is unchanged) and prints,
relative to the moment the questions are issued: when commands reached the worker, the forks,
the question prefill step, each decode step's launch, the host's wait for it and the GPU time
it took (CUDA events), and when the first tokens arrived. Then it replays the engine's own
decode graph for the same sessions back to back, and profiles one more round by kernel, to
tell the step's GPU time apart from whatever the engine adds around it.

    python perf/sessions_trace.py --sessions 64 --session-context 4096 [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import Bench  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.engine.runner import ModelRunner, PendingStep  # noqa: E402
from livelm.daemon.engine.scheduler import Chunk  # noqa: E402
from livelm.daemon.engine.worker import Worker  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402

EVENTS: list[dict[str, Any]] = []


def _timed(name: str, rows_arg: int | None = None) -> None:
    original = getattr(Worker, name)

    @functools.wraps(original)
    def timed(self: Worker, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            rows = len(args[rows_arg]) if rows_arg is not None else None
            kind = name
            if rows_arg is not None and name == "_step":
                kind = "prefill" if any(ch.length > 1 for ch in args[0]) else "step"
            EVENTS.append({"what": kind, "start": start, "end": time.perf_counter(),
                           "rows": rows})

    setattr(Worker, name, timed)


def _gpu_timed_decodes() -> None:
    """Each decode step launched gets CUDA events around it; its collect records how long the
    host waited for it and how long the GPU spent on it."""
    launch, collect = ModelRunner.launch_decode, PendingStep.collect
    marks: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    @functools.wraps(launch)
    def launch_timed(self: ModelRunner, *args: Any, **kwargs: Any) -> PendingStep:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        pending = launch(self, *args, **kwargs)
        end.record()
        marks[id(pending)] = (begin, end)
        return pending

    @functools.wraps(collect)
    def collect_timed(self: PendingStep) -> Any:
        start = time.perf_counter()
        try:
            return collect(self)
        finally:
            done = time.perf_counter()
            begin, end = marks.pop(id(self))
            EVENTS.append({"what": "collect", "start": start, "end": done, "rows": None,
                           "gpu_ms": begin.elapsed_time(end)})

    ModelRunner.launch_decode = launch_timed  # type: ignore[method-assign]
    PendingStep.collect = collect_timed  # type: ignore[method-assign]


def instrument() -> None:
    if torch.cuda.is_available():
        _gpu_timed_decodes()
    _timed("_apply_step", 0)
    _timed("_step", 0)
    _timed("_launch_decode", 0)
    _timed("_fork")
    _timed("_take_commands")
    _timed("_flush")


async def round_trace(bench: Bench, sids: list[str], answer: int) -> dict[str, Any]:
    EVENTS.clear()
    start = time.perf_counter()
    results = await asyncio.gather(*(bench.ask(sid, answer) for sid in sids))
    wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in results)
    events = [{**e, "start": (e["start"] - start) * 1e3, "end": (e["end"] - start) * 1e3}
              for e in EVENTS]
    return {"wall_ms": wall * 1e3, "tokens": sum(r[2] for r in results),
            "first_token_ms": firsts, "events": events}


def summarize(trace: dict[str, Any]) -> None:
    events = trace["events"]
    print(f"round: {trace['wall_ms']:.1f} ms, {trace['tokens']} tokens "
          f"({trace['tokens'] / trace['wall_ms'] * 1e3:.0f} tok/s); first tokens "
          f"{trace['first_token_ms'][0]:.1f} .. median "
          f"{statistics.median(trace['first_token_ms']):.1f} .. {trace['first_token_ms'][-1]:.1f} ms")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_kind.setdefault(e["what"], []).append(e)
    for kind, es in sorted(by_kind.items()):
        total = sum(e["end"] - e["start"] for e in es)
        rows = [e["rows"] for e in es if e["rows"] is not None]
        print(f"  {kind:15s} x{len(es):4d}  total {total:8.1f} ms  first at {es[0]['start']:7.1f}"
              f"  last ends {es[-1]['end']:7.1f}" + (f"  rows {rows[:12]}" if rows else ""))
    gpu = [e["gpu_ms"] for e in events if "gpu_ms" in e]
    if gpu:
        print(f"  decode steps on the GPU: median {statistics.median(gpu):.2f} ms "
              f"(min {min(gpu):.2f}, max {max(gpu):.2f})")
    steps = [e for e in sorted(events, key=lambda e: e["start"]) if e["what"] in (
        "prefill", "step", "_launch_decode", "collect",
                                               "_apply_step")]
    print("  first 24 events (start, duration ms, kind, rows, GPU ms):")
    for e in steps[:24]:
        print(f"    {e['start']:8.2f} {e['end'] - e['start']:7.2f}  {e['what']:15s} {e['rows']}"
              f" {e.get('gpu_ms', '')}")


def kernel_totals(prof: Any, steps: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            totals[event.name[:70]] = totals.get(event.name[:70], 0.0) + event.device_time / 1e3
    return {k: v / steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _session_chunks(engine: Engine, sids: list[str]) -> tuple[list[Chunk], Any]:
    worker = engine.worker
    seqs = [worker.sessions[engine.sessions[sid].slot] for sid in sids]
    chunks = [Chunk(s, s.num_computed - 1, 1, True) for s in seqs]
    return chunks, worker.runner.graphs.shape_for(chunks)


def replay_ms(engine: Engine, sids: list[str], repeat: int = 20) -> float:
    """Median GPU time of the engine's decode graph replayed for its sessions."""
    chunks, shape = _session_chunks(engine, sids)
    graphs = engine.worker.runner.graphs
    with torch.inference_mode():
        graphs.run(chunks, shape)
        marks = []
        for _ in range(repeat):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graphs.run(chunks, shape)
            end.record()
            marks.append((begin, end))
        torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in marks[2:])


def table_layout(engine: Engine, sids: list[str]) -> dict[str, Any]:
    """How the sessions' block tables run: steps of +1 (ascending), -1, other; id range."""
    chunks, _ = _session_chunks(engine, sids)
    steps = {"up": 0, "down": 0, "jump": 0}
    ids = [b for c in chunks for b in c.seq.block_table]
    for c in chunks:
        table = c.seq.block_table
        for a, b in zip(table[:-1], table[1:], strict=True):
            steps["up" if b == a + 1 else "down" if b == a - 1 else "jump"] += 1
    out = {**steps, "min_id": min(ids), "max_id": max(ids),
           "pool_blocks": engine.worker.kv.pool.num_blocks, "first_table": chunks[0].seq.block_table[:8]}
    print(f"session tables: {out}")
    return out


def replay_compacted(engine: Engine, sids: list[str]) -> float | None:
    """The decode graph replayed after copying every session's KV into fresh blocks taken in
    ascending order, one session after another (step_profile's layout); tables restored after."""
    chunks, _ = _session_chunks(engine, sids)
    kv = engine.worker.kv
    need = sum(len(c.seq.block_table) for c in chunks)
    if kv.pool.num_free < need:
        print(f"compacted replay skipped: {need} blocks needed, {kv.pool.num_free} free")
        return None
    fresh = sorted(kv.pool.allocate(need))
    saved, used = [], 0
    with torch.inference_mode():
        for c in chunks:
            table = c.seq.block_table
            mine = fresh[used:used + len(table)]
            used += len(table)
            kv.cache.copy_blocks(list(zip(table, mine, strict=True)))
            saved.append(table)
            c.seq.block_table = mine
            c.seq.table_version += 1
        torch.cuda.synchronize()
        try:
            ms = replay_ms(engine, sids)
        finally:
            for c, table in zip(chunks, saved, strict=True):
                c.seq.block_table = table
                c.seq.table_version += 1
            kv.pool.release(fresh)
    print(f"the same graph over the sessions' KV copied into ascending blocks: {ms:.2f} ms")
    return ms


def replay_sessions(engine: Engine, sids: list[str]) -> dict[str, Any]:
    """The engine's own decode graph replayed for its sessions (each rewrites its last token's
    KV, the same values), back to back: the GPU time of the step without the engine around it."""
    from torch.profiler import ProfilerActivity, profile

    chunks, shape = _session_chunks(engine, sids)
    graphs = engine.worker.runner.graphs
    median = replay_ms(engine, sids)
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graphs.run(chunks, shape)
            torch.cuda.synchronize()
    out = {"shape": shape, "replay_ms": median, "kernels": kernel_totals(prof, 5)}
    print(f"the engine's graph {shape} replayed back to back: {out['replay_ms']:.2f} ms per step")
    return out


async def profiled_round(bench: Bench, sids: list[str], answer: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        await asyncio.gather(*(bench.ask(sid, answer) for sid in sids))
        torch.cuda.synchronize()
    return kernel_totals(prof, answer - 1)  # per decode step (the prefill's kernels included)


def print_kernels(replay: dict[str, float], round_: dict[str, float]) -> None:
    print("  kernel ms per decode step: replayed graph | in the round (/ decode steps)")
    for name in list(dict.fromkeys([*replay, *round_]))[:22]:
        print(f"    {replay.get(name, 0.0):7.3f} | {round_.get(name, 0.0):7.3f}  {name}")


async def run(config: Config, model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = Engine(model, config, asyncio.get_running_loop())
    engine.start()
    bench = Bench(engine)
    try:
        sids = [await bench.open(f"Session {i} watches a market feed.")
                for i in range(args.sessions)]
        for sid in sids:
            await bench.fill(sid, args.session_context, batch=128)
        traces = []
        if torch.cuda.is_available():  # before any round: the GPU as fresh as it gets
            fresh = replay_ms(engine, sids)
            print(f"the engine's decode graph replayed before the rounds: {fresh:.2f} ms")
            traces.append({"replay_before_rounds_ms": fresh})
        for i in range(args.rounds + 1):  # the first round warms up
            trace = await round_trace(bench, sids, args.answer)
            if i:
                summarize(trace)
                traces.append(trace)
        if torch.cuda.is_available():
            replay = replay_sessions(engine, sids)
            round_ = await profiled_round(bench, sids, args.answer)
            print_kernels(replay["kernels"], round_)
            traces.append({"replay": replay, "round_kernels": round_})
            traces.append({"layout": table_layout(engine, sids)})
            if args.relayout:
                traces.append({"replay_compacted_ms": replay_compacted(engine, sids)})
            if args.noise_kv:
                with torch.inference_mode():
                    engine.worker.kv.cache.storage.normal_()
                noise = replay_ms(engine, sids)
                print(f"the same graph over normal(0, 1) KV (as step_profile's): {noise:.2f} ms")
                traces.append({"replay_noise_kv_ms": noise})
        return traces
    finally:
        await engine.stop(5.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--session-context", type=int, default=4096)
    p.add_argument("--answer", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--noise-kv", action="store_true",
                   help="at the end, replay the decode graph again over random-normal KV (the "
                   "step profile's), to tell the KV's values apart from its layout")
    p.add_argument("--relayout", action="store_true",
                   help="also replay with the sessions' KV copied into ascending fresh blocks "
                   "(a pool twice as large)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    config = Config(model=args.model, device="cuda" if cuda else "cpu",
                    dtype="bfloat16" if cuda else "float32",
                    kv_cache_tokens=720_000 if args.relayout else 360_000,
                    kernel_policy=args.kernel_policy if cuda else "")
    _, model = bind_and_load(config, progress=False)
    model = dataclasses.replace(model, eos_ids=frozenset())  # always generate the asked tokens
    instrument()
    traces = uvloop.run(run(config, model, args))
    if args.out:
        Path(args.out).write_text(json.dumps(traces))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
