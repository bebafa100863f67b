"""Where a question's time goes between `generate` and its first token, stage by stage.

Wraps the engine's stage methods with timers (this script only; the engine is unchanged),
asks many 1-token questions at a few context sizes, and prints the median moment each stage
ends, relative to the call to `generate`, with the GPU time of the replayed step (CUDA events).
Run twice per context: with Python's default GIL switch interval and with a short one.

    python perf/host_trace.py --contexts 3000,19000 --questions 30
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
from stream_bench import QUESTION, Bench, record  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine import runner as runner_module  # noqa: E402
from livelm.daemon.engine.detok import TextTracker  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.engine.graphs import StepGraphs  # noqa: E402
from livelm.daemon.engine.kv_cache import KVCache  # noqa: E402
from livelm.daemon.engine.kv_manager import KVManager  # noqa: E402
from livelm.daemon.engine.runner import ModelRunner, PendingStep  # noqa: E402
from livelm.daemon.engine.scheduler import Scheduler  # noqa: E402
from livelm.daemon.engine.staging import StepStaging  # noqa: E402
from livelm.daemon.engine.worker import Worker  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.protocol.messages import GenerateRequest  # noqa: E402

STAGES = [
    (Engine, "generate", "generate"),
    (Engine, "push", "push"),
    (Engine, "_write_records", "write_records"),
    (Worker, "_take_commands", "take_commands"),
    (Worker, "_take_records", "take_records"),
    (Worker, "_start_queries", "start_queries"),
    (Worker, "_fork", "fork"),
    (KVCache, "copy_blocks", "copy_blocks"),
    (KVCache, "copy_block", "copy_block"),
    (Scheduler, "plan", "plan"),
    (Worker, "_step", "step"),
    (KVManager, "prepare_write", "prepare_write"),
    (runner_module, "sampling_batch", "sampling_batch"),
    (StepStaging, "fill", "graph_fill"),
    (StepGraphs, "_replay", "graph_launch"),
    (StepGraphs, "_copy_tables", "copy_tables"),
    (torch.cuda.CUDAGraph, "replay", "graph_replay_call"),
    (ModelRunner, "run", "runner_run"),
    (ModelRunner, "launch_decode", "runner_launch"),  # a question's step, since 922df62
    (PendingStep, "collect", "collect"),
    (Worker, "_apply_step", "apply_step"),
    (Worker, "_on_token", "on_token"),
    (TextTracker, "update", "detok"),
    (Worker, "_flush", "flush"),
    (Engine, "_apply_report", "apply_report"),
]


class Trace:
    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []
        self.gpu: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.origin: torch.cuda.Event | None = None  # recorded when a traced request starts

    def start(self) -> float:
        """Clears the marks; on the GPU, records the origin of the GPU timeline (the GPU is
        idle then, so the event passes at once)."""
        self.marks.clear()
        self.gpu.clear()
        if torch.cuda.is_available():
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
        return time.perf_counter()

    def wrap(self, cls: type, name: str, label: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.marks.append((label, start, time.perf_counter()))

        setattr(cls, name, timed)

    def wrap_gpu(self) -> None:
        original = StepGraphs._replay  # both variants: with logits and without

        def timed(graphs: StepGraphs, *args: Any, **kwargs: Any) -> Any:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = original(graphs, *args, **kwargs)
            end.record()
            self.gpu.append((begin, end))
            return out

        StepGraphs._replay = timed  # type: ignore[method-assign]


async def one_question(bench: Bench, sid: str, trace: Trace, max_tokens: int) -> dict[str, float]:
    start = trace.start()
    handle = bench.engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=max_tokens))
    first = None
    async for _ in handle:
        first = time.perf_counter() if first is None else first
    await handle.result()
    out: dict[str, float] = {"first_token": (first - start) * 1e3}
    out.update(stage_times(trace, start))
    return out


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for s in samples for k in s}
    summary = {k: statistics.median([s[k] for s in samples if k in s]) for k in keys}
    return dict(sorted(summary.items(), key=lambda kv: kv[1]))


def stage_times(trace: Trace, start: float) -> dict[str, float]:
    """When each stage first ended after ``start``, and the total time spent in each (ms)."""
    out: dict[str, float] = {}
    for label, begin, end in trace.marks:
        if end >= start:
            out.setdefault(label + "_end", (end - start) * 1e3)
            out[label + "_ms"] = out.get(label + "_ms", 0.0) + (end - begin) * 1e3
    if trace.gpu:
        torch.cuda.synchronize()
        out["gpu_step_ms"] = sum(b.elapsed_time(e) for b, e in trace.gpu)
        if trace.origin is not None:  # when the GPU began and ended the first traced step
            out["gpu_begin"] = trace.origin.elapsed_time(trace.gpu[0][0])
            out["gpu_end"] = trace.origin.elapsed_time(trace.gpu[0][1])
    return out


async def one_push(bench: Bench, sid: str, trace: Trace) -> dict[str, float]:
    """One record pushed to an idle session, until the session reports it ingested."""
    await asyncio.sleep(0.01)  # idle daemon
    start = trace.start()
    await bench.engine.push(sid, [record(bench.next_record)])
    acked = time.perf_counter()
    bench.next_record += 1
    await bench.wait_ingested(sid)
    out = {"acked": (acked - start) * 1e3, "queryable": (time.perf_counter() - start) * 1e3}
    out.update(stage_times(trace, start))
    return out


async def run(model: Any, config: Config, args: argparse.Namespace, trace: Trace) -> dict:
    engine = Engine(model, config, asyncio.get_running_loop())
    engine.start()
    bench = Bench(engine)
    results: dict[str, Any] = {}
    try:
        sid = await bench.open()
        for ctx in args.contexts:
            await bench.fill(sid, ctx)
            for interval in (0.005, 0.0002):
                sys.setswitchinterval(interval)
                for _ in range(3):
                    await one_question(bench, sid, trace, args.max_tokens)
                samples = [
                    await one_question(bench, sid, trace, args.max_tokens)
                    for _ in range(args.questions)
                ]
                keys = sorted(
                    {k for s in samples for k in s},
                    key=lambda k: statistics.median([s.get(k, 0.0) for s in samples]),
                )
                summary = {k: statistics.median([s[k] for s in samples if k in s]) for k in keys}
                results[f"{ctx}@switch={interval}"] = summary
                print(f"context {engine.sessions[sid].context_tokens}, switch interval {interval}:")
                for k, v in summary.items():
                    print(f"  {k:>22}: {v:8.3f} ms")
            sys.setswitchinterval(0.005)
            pushes = summarize([await one_push(bench, sid, trace) for _ in range(args.questions)])
            results[f"{ctx}@push"] = pushes
            print(f"context {engine.sessions[sid].context_tokens}, one pushed record:")
            for k, v in pushes.items():
                print(f"  {k:>22}: {v:8.3f} ms")
    finally:
        await engine.stop(5.0)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument(
        "--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[3000, 19000]
    )
    p.add_argument("--questions", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=1,
                   help="tokens per answer (the first token is timed; more than 2 puts decode "
                   "steps in flight while it is reported)")
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--device", default="cuda",
                   help="cpu: the host stages with a small model's eager steps (no graphs)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    config = Config(
        model=args.model,
        device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        kv_cache_tokens=120_000,
        kernel_policy=args.kernel_policy if args.device == "cuda" else "",
    )
    _, model = bind_and_load(config)
    model = dataclasses.replace(model, eos_ids=frozenset())
    trace = Trace()
    for cls, name, label in STAGES:
        trace.wrap(cls, name, label)
    if args.device == "cuda":
        trace.wrap_gpu()
    results = uvloop.run(run(model, config, args, trace))
    if args.out:
        out = Path(args.out) / "host-trace.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
