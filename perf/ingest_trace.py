"""Where an ingest's time goes: the stream bench's sized fill (2.6k -> 8k tokens by default),
with the push, every worker step (its chunks' tokens, its wall span and its GPU time by CUDA
events) and the moment the session is queryable, relative to the fill's first push.

Wraps ``Engine.push``, ``Worker._step`` and ``ModelRunner.run`` with timers (this script
only; the engine is unchanged). Each repeat fills a fresh session, as the bench's does.

    python perf/ingest_trace.py [--start 2600 --target 8192 --repeats 3] [--out DIR]

--profile: one more fill under torch.profiler: each kernel's total, and the GPU's idle gaps
between kernels during the fill (host-bound launches show up there, slower kernels in the
totals, to set against ``step_profile.py --chunks`` for the same chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import Bench, start_bench  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.engine.runner import ModelRunner  # noqa: E402
from livelm.daemon.engine.worker import Worker  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402


@dataclasses.dataclass
class Marks:
    """Wall spans (perf_counter seconds) and GPU spans (CUDA event pairs) as they happen."""

    spans: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    gpu: list[tuple[torch.cuda.Event, torch.cuda.Event]] = dataclasses.field(default_factory=list)

    def wrap(self, cls: type, name: str, label: str,
             describe: Callable[..., dict[str, Any]] | None = None) -> None:
        original = getattr(cls, name)

        def note(start: float, args: tuple[Any, ...]) -> None:
            span = {"stage": label, "start": start, "end": time.perf_counter()}
            if describe is not None:
                span.update(describe(*args))
            self.spans.append(span)

        if inspect.iscoroutinefunction(original):
            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    note(start, args)

            setattr(cls, name, timed_async)
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                note(start, args)

        setattr(cls, name, timed)

    def wrap_gpu(self) -> None:
        """GPU time of each runner call (CUDA events around it)."""
        original = ModelRunner.run

        @functools.wraps(original)
        def timed(runner: ModelRunner, *args: Any, **kwargs: Any) -> Any:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            try:
                return original(runner, *args, **kwargs)
            finally:
                end.record()
                self.gpu.append((begin, end))

        ModelRunner.run = timed  # type: ignore[method-assign]


def _chunks(worker: Worker, chunks: list) -> dict[str, Any]:
    return {"tokens": [ch.length for ch in chunks]}


async def one_fill(bench: Bench, marks: Marks, start_tokens: int, target: int,
                   around: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """A fresh session filled to start_tokens, then the timed fill to target inside
    ``around()`` (a context manager: the profiler, or nothing)."""
    sid = await bench.open()
    await bench.fill(sid, start_tokens)
    marks.spans.clear()
    marks.gpu.clear()
    with around():
        origin, wall_origin = time.perf_counter(), time.time()
        tokens, seconds = await bench.fill(sid, target)
    queryable = (time.perf_counter() - origin) * 1e3
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    spans = [dict(s, start=(s["start"] - origin) * 1e3, end=(s["end"] - origin) * 1e3)
             for s in marks.spans]
    gpu_ms = [b.elapsed_time(e) for b, e in marks.gpu]
    steps = [s for s in spans if s["stage"] == "step"]
    if len(gpu_ms) == len(steps):  # one runner call per step (a failed step retries chunks)
        for step, ms in zip(steps, gpu_ms, strict=True):
            step["gpu_ms"] = ms
    elif gpu_ms:
        print(f"  {len(gpu_ms)} runner calls for {len(steps)} steps: GPU times not matched",
              flush=True)
    # the fill's probe push (and its steps) come first, before its clock starts
    return {"tokens": tokens, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
            "clock_start": queryable - seconds * 1e3, "queryable": queryable, "spans": spans,
            "wall_origin": wall_origin}


async def profiled_fill(bench: Bench, marks: Marks, start_tokens: int,
                        target: int) -> dict[str, Any]:
    """``one_fill`` under torch.profiler: kernel totals, the idle gaps between kernels, and
    the timeline (each kernel's start and duration in ms from the first, and its name)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
    fill = await one_fill(bench, marks, start_tokens, target, around=lambda: prof)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type.name == "CUDA")
    totals: dict[str, float] = {}
    for begin, end, name in kernels:
        totals[name[:90]] = totals.get(name[:90], 0.0) + (end - begin) / 1e3
    gaps, reach = [], kernels[0][1] if kernels else 0.0
    for begin, end, _ in kernels[1:]:
        if begin > reach:
            gaps.append((begin - reach) / 1e3)
        reach = max(reach, end)
    span = (reach - kernels[0][0]) / 1e3 if kernels else 0.0
    origin = kernels[0][0] if kernels else 0.0
    fill["profile"] = {"timeline": [((b - origin) / 1e3, (e - b) / 1e3, n[:40])
                                    for b, e, n in kernels],
                       "kernel_ms": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
                       "gpu_span_ms": span, "idle_ms": sum(gaps),
                       "gaps_over_0_1ms": sorted((g for g in gaps if g > 0.1), reverse=True)}
    print(f"profiled fill: {fill['tokens']} tokens in {fill['ms']:.1f} ms; GPU span "
          f"{span:.1f} ms, idle {sum(gaps):.2f} ms in "
          f"{len(gaps)} gaps, of which over 0.1 ms: "
          f"{[round(g, 2) for g in fill['profile']['gaps_over_0_1ms'][:12]]}", flush=True)
    for name, ms in list(fill["profile"]["kernel_ms"].items())[:10]:
        print(f"    {ms:8.2f} ms  {name}", flush=True)
    return fill


async def run(model: Any, config: Config, args: argparse.Namespace, marks: Marks) -> list[dict]:
    bench = start_bench(model, config)
    engine = bench.engine
    fills = []
    try:
        await one_fill(bench, marks, args.start, args.target)  # warm-up
        for _ in range(args.repeats):
            fill = await one_fill(bench, marks, args.start, args.target)
            fills.append(fill)
            print(f"{fill['tokens']} tokens in {fill['ms']:.1f} ms "
                  f"({fill['tokens_per_s']:.0f} tokens/s), clock from "
                  f"{fill['clock_start']:.2f} to {fill['queryable']:.2f} ms:", flush=True)
            for s in fill["spans"]:
                extra = ""
                if "tokens" in s:
                    extra = f" chunks {s['tokens']}"
                if "gpu_ms" in s:
                    extra += f", GPU {s['gpu_ms']:.1f} ms"
                print(f"  {s['stage']:>6} {s['start']:8.2f} -> {s['end']:8.2f} ms{extra}",
                      flush=True)
        if args.profile:
            fills.append(await profiled_fill(bench, marks, args.start, args.target))
    finally:
        await engine.stop(5.0)
    return fills


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--start", type=int, default=2600)
    p.add_argument("--target", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--device", default="cuda",
                   help="cpu: the host side only, with the demo model (a smoke run)")
    p.add_argument("--no-data-graphs", action="store_true",
                   help="graph_max_data 0: data chunks past the question sizes run eagerly")
    p.add_argument("--profile", action="store_true",
                   help="one more fill under torch.profiler (kernel totals, GPU idle gaps)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    cuda = args.device == "cuda"
    config = Config(model=args.model if cuda else "demo", device=args.device,
                    dtype="bfloat16" if cuda else "float32", kv_cache_tokens=120_000,
                    max_batch_tokens=args.max_batch_tokens,
                    graph_max_data=0 if args.no_data_graphs else Config().graph_max_data,
                    kernel_policy=args.kernel_policy if cuda else "")
    _, model = bind_and_load(config)
    model = dataclasses.replace(model, eos_ids=frozenset())
    marks = Marks()
    marks.wrap(Engine, "push", "push")
    marks.wrap(Worker, "_step", "step", _chunks)
    if cuda:
        marks.wrap_gpu()
    fills = uvloop.run(run(model, config, args, marks))
    if args.out:
        out = Path(args.out) / "ingest-trace.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "fills": fills}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
