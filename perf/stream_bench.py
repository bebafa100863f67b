"""The streaming benchmark of PERFORMANCE.md, with its baselines measured in the same run.

A session with a short prompt takes OHLCV records until its context holds each target size;
at each size a ~32-token question is asked (first token, and 8 answer tokens greedily), decode
speed is measured, and ingest throughput and push-to-queryable latency are timed. Then 64
sessions of 4k context query at once. Baselines: the same engine with its state disabled
(every query re-prefills its context) and Hugging Face transformers (context cached, and
re-prefill). Prints one table with the floor and the ratio to it; writes JSON.

    python perf/stream_bench.py --model random:llama-3.1-8b --out perf/results
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_meta  # noqa: E402
from floor import Ceilings, forward_floor_ms, measure_ceilings, prefill_floor_tokens_per_s  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.daemon.model.loader import LoadedModel  # noqa: E402
from livelm.protocol.messages import GenerateRequest, InitRequest  # noqa: E402

QUESTION = (
    "Looking at the most recent records, is the price trend up or down, and what is the "
    "last close?"
)

CLASSIFY = "Answer 1 if the price trend is up, 2 if it is down, 3 if it is flat."
CHOICES = ["1", "2", "3"]  # single tokens (digits stand alone): one forward pass


FIRST_PUSH = 8  # records of the first push of a fill, which measures their mean token count


def record(i: int) -> dict[str, Any]:
    base = 180 + (i % 97) * 0.37
    return {"s": "AAPL", "t": 1700000000 + i, "o": round(base, 2), "h": round(base + 0.4, 2),
            "l": round(base - 0.3, 2), "c": round(base + 0.1, 2), "v": 1000 + (i * 37) % 5000}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_bench(model: Any, config: Config) -> Bench:
    """An engine started on ``model`` under ``config``, for a bench to drive (stop it with
    ``bench.engine.stop``); prints the data graph sizes it captured and kept."""
    engine = Engine(model, config, asyncio.get_running_loop())
    engine.start()
    graphs = engine.worker.runner.graphs
    if graphs is not None:
        print(f"data graph sizes kept: {graphs.data_sizes}; packed: {graphs.packed_sizes}",
              flush=True)
    return Bench(engine)


class Bench:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.next_record = 0

    async def open(self, prompt: str = "You watch a market feed.") -> str:
        reply = await self.engine.init_session(InitRequest(prompt=prompt, template="raw", format="ohlcv"))
        return reply.session_id

    async def wait_ingested(self, sid: str) -> None:
        """Until every accepted entry of the session is in its KV: woken by the session's
        ``data_updated`` event, as a subscriber would be (polling would compete with the
        worker thread for the GIL and round the latency up to its period)."""
        session = self.engine.sessions[sid]
        if session.ingested_seq >= session.last_seq:
            return
        events = self.engine.subscribe(sid, frozenset({"data"}))
        try:
            while session.ingested_seq < session.last_seq:
                await events.__anext__()
        finally:
            events.close()

    async def fill(self, sid: str, target_tokens: int, batch: int = 256) -> tuple[int, float]:
        """Pushes records until the context holds target_tokens; returns the tokens and
        seconds of the sized pushes, push to queryable. A probe push of a few records comes
        first, ingested before the clock starts, to learn their token count; the pushes after
        it are sized from that (at most ``batch`` records each), so the context lands within a
        record or two of the target rather than a batch past it."""
        session = self.engine.sessions[sid]
        per_record = await self._probe_push(sid, target_tokens)
        await self.wait_ingested(sid)
        before = session.context_tokens
        start = time.perf_counter()
        while session.context_tokens < target_tokens:
            left = target_tokens - session.context_tokens
            count = max(1, min(batch, math.ceil(left / per_record) + 1))  # one spare: no top-up
            per_record = await self._push_records(sid, count, target_tokens)
        await self.wait_ingested(sid)
        return session.context_tokens - before, time.perf_counter() - start

    async def _probe_push(self, sid: str, target_tokens: int) -> float:
        """Tokens per record, from a push of FIRST_PUSH records (none once the context holds
        the target)."""
        if self.engine.sessions[sid].context_tokens >= target_tokens:
            return 1.0
        return await self._push_records(sid, FIRST_PUSH, target_tokens)

    async def _push_records(self, sid: str, count: int, target_tokens: int) -> float:
        """Pushes ``count`` records; returns their mean token count."""
        session = self.engine.sessions[sid]
        rows = [record(self.next_record + i) for i in range(count)]
        self.next_record += count
        grown = session.context_tokens
        await self.engine.push(sid, rows)
        if session.context_tokens <= grown:
            raise RuntimeError(f"session {sid} stopped growing at {grown} tokens "
                               f"(its window is below the {target_tokens}-token target)")
        return (session.context_tokens - grown) / count

    async def ask(self, sid: str, max_tokens: int) -> tuple[float, float, int]:
        """(first token ms, total ms, tokens) of one greedy answer."""
        start = time.perf_counter()
        handle = self.engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=max_tokens))
        first = None
        async for _ in handle:
            if first is None:
                first = time.perf_counter()
        done = await handle.result()
        end = time.perf_counter()
        return (first - start) * 1e3, (end - start) * 1e3, len(done.tokens)

    async def classify(self, sid: str) -> float:
        """ms for one classification answer (choices scored in a single pass)."""
        start = time.perf_counter()
        handle = self.engine.generate(sid, GenerateRequest(prompt=CLASSIFY, choices=CHOICES))
        done = await handle.result()
        if done.choice not in CHOICES:
            raise RuntimeError(f"classification answered {done.choice!r}")
        return (time.perf_counter() - start) * 1e3

    async def push_to_queryable(self, sid: str, count: int) -> dict[str, Any]:
        """Latency of ``count`` single-record pushes, each with the worker steps it took and
        the collector's pauses (by generation) that fell inside it: what a tail is made of."""
        samples = []
        for _ in range(count):
            steps = self.engine.worker.steps
            with GcPauses() as pauses:
                start = time.perf_counter()
                await self.engine.push(sid, [record(self.next_record)])
                self.next_record += 1
                await self.wait_ingested(sid)
                ms = (time.perf_counter() - start) * 1e3
            samples.append({"ms": ms, "steps": self.engine.worker.steps - steps,
                            "gc_ms": pauses.by_generation()})
            await asyncio.sleep(0.002)
        lat = [s["ms"] for s in samples]
        return {"median": statistics.median(lat), "p99": pct(lat, 0.99), "samples": samples}


class GcPauses:
    """Pauses of Python's cyclic collector while the block runs (through ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._began = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._began) * 1e3))

    def by_generation(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for gen, ms in self.pauses:
            total[str(gen)] = total.get(str(gen), 0.0) + ms
        return total


async def engine_run(model: LoadedModel, config: Config, args: argparse.Namespace, full: bool) -> dict:
    engine = Engine(model, config, asyncio.get_running_loop())
    engine.start()
    bench = Bench(engine)
    out: dict[str, Any] = {"contexts": {}}
    try:
        await warm_up(bench, args)
        sid = await bench.open()
        for ctx in args.contexts:
            tokens, seconds = await bench.fill(sid, ctx)
            row: dict[str, Any] = {"context_tokens": engine.sessions[sid].context_tokens,
                                   "ingest_tokens_per_s": tokens / seconds}
            repeats = args.repeats if full else max(2, args.repeats // 5)
            await bench.ask(sid, 1)  # warm-up at this size
            firsts = [(await bench.ask(sid, 1))[0] for _ in range(repeats)]
            row["first_token_ms"] = {"median": statistics.median(firsts), "p99": pct(firsts, 0.99)}
            totals = [(await bench.ask(sid, 8))[1] for _ in range(max(2, repeats // 2))]
            row["question_plus_8_ms"] = statistics.median(totals)
            await bench.classify(sid)  # warm-up
            classify = [await bench.classify(sid) for _ in range(repeats)]
            row["classify_ms"] = {"median": statistics.median(classify), "p99": pct(classify, 0.99)}
            if full:
                first, total, n = await bench.ask(sid, 65)
                row["decode_ms_per_token"] = (total - first) / (n - 1)
            out["contexts"][ctx] = row
            print(f"  context {row['context_tokens']}: first token {row['first_token_ms']['median']:.2f} ms", flush=True)
        if full:
            out["push_to_queryable_ms"] = await bench.push_to_queryable(sid, args.push_samples)
            await engine.close_session(sid)
            if args.sessions:
                out["many_sessions"] = await many_sessions(bench, args)
    finally:
        await engine.stop(5.0)
    return out


async def warm_up(bench: Bench, args: argparse.Namespace) -> None:
    """One unmeasured pass over the same shapes, so kernel compilation stays out of the figures."""
    sid = await bench.open()
    for ctx in args.contexts:
        await bench.fill(sid, ctx)
        await bench.ask(sid, 8)
    await bench.push_to_queryable(sid, 5)
    await bench.engine.close_session(sid)


async def many_sessions(bench: Bench, args: argparse.Namespace) -> dict:
    sids = [await bench.open(f"Session {i} watches a market feed.") for i in range(args.sessions)]
    for sid in sids:
        await bench.fill(sid, args.session_context, batch=128)
    await asyncio.gather(*(bench.ask(sid, args.session_answer) for sid in sids))  # warm-up
    start = time.perf_counter()
    results = await asyncio.gather(*(bench.ask(sid, args.session_answer) for sid in sids))
    wall = time.perf_counter() - start
    firsts = [r[0] for r in results]
    contexts = [bench.engine.sessions[sid].context_tokens for sid in sids]
    return {"sessions": len(sids), "context_tokens": round(statistics.mean(contexts)),
            "answer_tokens_per_s": sum(r[2] for r in results) / wall,
            "first_token_ms": {"median": statistics.median(firsts), "p99": pct(firsts, 0.99)}}


def hf_baseline(model_config, args: argparse.Namespace, device: torch.device) -> dict:
    """transformers over the same shapes: re-prefill, and the context cached with the question
    appended; eager decode."""
    import transformers

    c = model_config
    scaling = c.rope_scaling
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
        rope_scaling=None if scaling is None else {"rope_type": "llama3", **dataclasses.asdict(scaling)},
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    question = torch.randint(0, 1000, (1, 32), device=device)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for ctx in args.contexts:
            context = torch.randint(0, 1000, (1, ctx), device=device)
            full = torch.cat([context, question], dim=1)
            model(full[:, :64])  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(full, logits_to_keep=1)
            torch.cuda.synchronize()
            reprefill = (time.perf_counter() - t) * 1e3
            cache = transformers.DynamicCache(config=hf_config)
            model(context, past_key_values=cache, use_cache=True, logits_to_keep=1)
            firsts = []
            for _ in range(5):
                torch.cuda.synchronize()
                t = time.perf_counter()
                step = model(question, past_key_values=cache, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                firsts.append((time.perf_counter() - t) * 1e3)
                cache.crop(ctx)
            step = model(question, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = step.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(8):
                token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            out[ctx] = {"reprefill_first_token_ms": reprefill,
                        "cached_first_token_ms": statistics.median(firsts),
                        "decode_ms_per_token": (time.perf_counter() - t) * 1e3 / 8}
            del cache
            print(f"  hf context {ctx}: cached {out[ctx]['cached_first_token_ms']:.1f} ms, re-prefill {reprefill:.1f} ms", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def table(results: dict, config, ceilings: Ceilings) -> str:
    rows = [("metric", "context", "livelm", "state off", "HF cached", "HF re-prefill", "floor", "x floor", "target")]
    live, off, hf = results["livelm"]["contexts"], results["stateless"]["contexts"], results.get("hf", {})
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for ctx, row in live.items():
        floor = forward_floor_ms(config, ceilings, row["context_tokens"], 32)
        first = row["first_token_ms"]["median"]
        h = hf.get(ctx) or hf.get(str(ctx)) or {}
        rows.append(("first token ms", str(row["context_tokens"]), fmt(first),
                     fmt(off.get(ctx, {}).get("first_token_ms", {}).get("median")),
                     fmt(h.get("cached_first_token_ms")), fmt(h.get("reprefill_first_token_ms")),
                     fmt(floor), fmt(first / floor), f"<= {1.3 * floor:.2f}"))
        rows.append(("32q + 8 tokens ms", str(row["context_tokens"]), fmt(row["question_plus_8_ms"]),
                     fmt(off.get(ctx, {}).get("question_plus_8_ms")), "-", "-", "-", "-",
                     "<= 42" if 18000 <= ctx <= 20000 else "-"))
        if "classify_ms" in row:
            cls = row["classify_ms"]["median"]
            rows.append(("classify (3 choices) ms", str(row["context_tokens"]), fmt(cls),
                         fmt(off.get(ctx, {}).get("classify_ms", {}).get("median")), "-", "-",
                         fmt(floor), fmt(cls / floor), f"<= {1.3 * floor:.2f}"))
        if "decode_ms_per_token" in row:
            dfloor = forward_floor_ms(config, ceilings, row["context_tokens"], 1)
            rows.append(("decode ms/token", str(row["context_tokens"]), fmt(row["decode_ms_per_token"]), "-",
                         fmt(h.get("decode_ms_per_token")), "-", fmt(dfloor),
                         fmt(row["decode_ms_per_token"] / dfloor), f"<= {1.15 * dfloor:.2f}"))
        pfloor = prefill_floor_tokens_per_s(config, ceilings)
        rows.append(("ingest tokens/s", str(row["context_tokens"]), f"{row['ingest_tokens_per_s']:.0f}",
                     "-", "-", "-", f"{pfloor:.0f}", fmt(pfloor / row["ingest_tokens_per_s"]), ">= 36000"))
    if "push_to_queryable_ms" in results["livelm"]:
        p = results["livelm"]["push_to_queryable_ms"]
        rows.append(("push->queryable p99 ms", "-", fmt(p["p99"]), "-", "-", "-", "-", "-", "<= 10"))
    if "many_sessions" in results["livelm"]:
        m = results["livelm"]["many_sessions"]
        rows.append((f"{m['sessions']} sessions tokens/s", str(m["context_tokens"]),
                     f"{m['answer_tokens_per_s']:.0f}", "-", "-", "-", "-", "-", ">= 4000"))
        rows.append((f"{m['sessions']} sessions p99 first ms", str(m["context_tokens"]),
                     fmt(m["first_token_ms"]["p99"]), "-", "-", "-", "-", "-", "<= 60"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2600, 8192, 19000, 32000])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--push-samples", type=int, default=200)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--session-context", type=int, default=4096)
    p.add_argument("--session-answer", type=int, default=32)
    p.add_argument("--kv-cache-tokens", type=int, default=360_000)
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--kernel-policy", default=str(Path(__file__).with_name("bench_policy.yaml")))
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-stateless", action="store_true")
    p.add_argument("--block-size", type=int, default=Config().block_size, help="tokens per KV block")
    p.add_argument("--no-decode-ahead", action="store_true",
                   help="step decode one token at a time (the host waits for each step)")
    p.add_argument("--no-kernel-warm-up", action="store_true",
                   help="skip the start-up compile of every kernel variant (an A/B of its cost)")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="leave start-up objects in the cyclic collector's walks (gc_freeze off)")
    p.add_argument("--graph-max-data", type=int, default=Config().graph_max_data,
                   help="the longest session-data chunk a graph replays (0: past the question "
                   "sizes, data steps run eagerly)")
    p.add_argument("--graph-max-data-seqs", type=int, default=Config().graph_max_data_seqs,
                   help="the most sessions whose data one packed graph holds (0: none)")
    p.add_argument("--cache-dir", default=os.environ.get("LIVELM_HOME", "/tmp/livelm-cache"))
    p.add_argument("--out", default="perf/results")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if (why := run_meta.cuda_missing("stream_bench.py")) is not None:
        print(why, file=sys.stderr)
        return 2
    config = Config(model=args.model, device="cuda", dtype=args.dtype, cache_dir=args.cache_dir,
                    kv_cache_tokens=args.kv_cache_tokens, max_batch_tokens=args.max_batch_tokens,
                    kernel_policy=args.kernel_policy, warm_up_kernels=not args.no_kernel_warm_up,
                    decode_run_ahead=not args.no_decode_ahead, block_size=args.block_size,
                    gc_freeze=not args.no_gc_freeze, graph_max_data=args.graph_max_data,
                    graph_max_data_seqs=args.graph_max_data_seqs)
    device = config.torch_device()
    ceilings = measure_ceilings(device)
    print(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s", flush=True)
    binding, model = bind_and_load(config)
    model = dataclasses.replace(model, eos_ids=frozenset())  # always generate the asked tokens
    results: dict[str, Any] = {"kernels": binding.chosen()}
    print("livelm:", flush=True)
    results["livelm"] = uvloop.run(engine_run(model, config, args, full=True))
    release_engine_memory(device)
    if not args.skip_stateless:
        print("livelm with state disabled (re-prefill every query):", flush=True)
        # Re-prefill holds the session's context and one copy of it per query: three times
        # the longest context is room enough, and leaves the card's memory to spare.
        pool = min(config.kv_cache_tokens or 1 << 30, 3 * max(args.contexts) + 16384)
        stateless = msgspec.structs.replace(config, reprefill_queries=True, kv_cache_tokens=pool)
        results["stateless"] = uvloop.run(engine_run(model, stateless, args, full=False))
    else:
        results["stateless"] = {"contexts": {}}
    model_config = model.config
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_hf:
        print("transformers:", flush=True)
        results["hf"] = hf_baseline(model_config, args, device)
    results["ceilings"] = dataclasses.asdict(ceilings)
    results["meta"] = {
        "commit": run_meta.commit(),
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "python": platform.python_version(), "model": args.model, "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d"), "args": vars(args),
    }
    print(table(results, model_config, ceilings))
    print(push_tail(results["livelm"].get("push_to_queryable_ms")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = results["meta"]["gpu"].replace(" ", "-").lower()
    path = out / f"{results['meta']['date']}-{gpu}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return 0


def release_engine_memory(device: torch.device) -> None:
    """Frees the stopped engine's KV cache and graph pools before the next engine allocates
    its own: on an 80 GB card two caches do not fit side by side."""
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device) / 2**30
    print(f"after the engine stopped: {held:.1f} GiB still allocated", flush=True)


def push_tail(push: dict[str, Any] | None) -> str:
    """One line on the slowest tenth of the push samples: their steps and collector pauses."""
    if not push:
        return "push tail: not measured"
    tail = sorted(push["samples"], key=lambda s: s["ms"])[-max(1, len(push["samples"]) // 10):]
    multi = sum(s["steps"] > 1 for s in tail)
    gc_ms = [sum(s["gc_ms"].values()) for s in tail]
    return (f"push tail (slowest {len(tail)}): {tail[0]['ms']:.2f}-{tail[-1]['ms']:.2f} ms, "
            f"{multi} took more than one step, {sum(g > 0 for g in gc_ms)} had a collection "
            f"(up to {max(gc_ms):.2f} ms)")


if __name__ == "__main__":
    raise SystemExit(main())
