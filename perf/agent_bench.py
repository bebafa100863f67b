"""The agent benchmark: a long tool-using conversation, with and without KV reuse across turns.

Each turn appends a tool result of 200 to 2,000 tokens to the conversation and asks for the
next action (up to 64 answer tokens, greedy); the answer joins the conversation. Three runs
over the same turns, in one process: the engine with its prefix cache (a turn computes only
the tokens after the previous turn), the engine with reuse disabled
(``prefix_cache_conversations=0``: every turn prefills its whole prompt), and Hugging Face
transformers re-prefilling every turn. Prints per-turn first-token times and total wall time;
writes JSON to perf/results/<date>-<gpu>-agent.json.

    python perf/agent_bench.py --model random:llama-3.1-8b          # on the GPU
    python perf/agent_bench.py --model demo --turns 5                # a quick check on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_meta  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.daemon.model.config import ModelConfig  # noqa: E402
from livelm.daemon.model.loader import LoadedModel  # noqa: E402
from livelm.protocol.messages import GenerateRequest  # noqa: E402

SYSTEM_TOKENS = 600  # the agent's instructions and tool list
ASK_TOKENS = 24  # "what next?" after each tool result


@dataclasses.dataclass(frozen=True)
class Script:
    """The tokens each run appends, fixed by the seed; answers are each run's own."""

    system: list[int]
    tool_results: list[list[int]]
    ask: list[int]


def make_script(args: argparse.Namespace, vocab: int) -> Script:
    rng = np.random.default_rng(args.seed)
    draw = lambda n: rng.integers(100, min(vocab, 30000), n).tolist()  # noqa: E731
    sizes = rng.integers(args.tool_min, args.tool_max + 1, args.turns)
    return Script(draw(SYSTEM_TOKENS), [draw(int(n)) for n in sizes], draw(ASK_TOKENS))


def total_tokens(script: Script, answer: int) -> int:
    return len(script.system) + sum(len(t) + len(script.ask) + answer for t in script.tool_results)


# ---- the engine --------------------------------------------------------------------------------
async def engine_turns(
    model: LoadedModel, config: Config, script: Script, answer: int, warm_turns: int | None
) -> dict:
    engine = Engine(model, config, asyncio.get_running_loop())
    engine.start()
    try:
        await conversation(engine, warm_up_script(script, warm_turns), answer)  # unmeasured
        start = time.perf_counter()
        turns = await conversation(engine, script, answer)
        wall = time.perf_counter() - start
        return {"turns": turns, "wall_s": wall, "metrics": engine.metrics()}
    finally:
        await engine.stop(5.0)


def warm_up_script(script: Script, turns: int | None = None) -> Script:
    """The same shapes with other tokens: every prompt and chunk length the measured run
    meets, so Triton's per-shape compilations stay out of the figures."""
    tools = script.tool_results[:turns]
    return Script(script.system[::-1], [t[::-1] for t in tools], script.ask[::-1])


async def conversation(engine: Engine, script: Script, answer: int) -> list[dict]:
    prompt, turns = list(script.system), []
    for tool in script.tool_results:
        prompt += tool + script.ask
        start = time.perf_counter()
        completion = await engine.complete(prompt, GenerateRequest(prompt="", max_tokens=answer))
        first = None
        async for _ in completion.handle:
            first = first or time.perf_counter()
        done = await completion.handle.result()
        end = time.perf_counter()
        turns.append(
            {
                "prompt_tokens": completion.prompt_tokens,
                "cached_tokens": completion.cached_tokens,
                "first_token_ms": (first - start) * 1e3,
                "turn_ms": (end - start) * 1e3,
            }
        )
        prompt += done.tokens
    return turns


# ---- transformers ------------------------------------------------------------------------------
def hf_turns(
    c: ModelConfig, script: Script, answer: int, device: torch.device, dtype: torch.dtype
) -> dict:
    import transformers

    scaling = c.rope_scaling
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
        attn_implementation="sdpa",
        rope_scaling=None
        if scaling is None
        else {"rope_type": "llama3", **dataclasses.asdict(scaling)},
    )
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.inference_mode():
        hf_conversation(model, hf_config, warm_up_script(script, 2), answer, device)
        start = time.perf_counter()
        turns = hf_conversation(model, hf_config, script, answer, device)
        wall = time.perf_counter() - start
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"turns": turns, "wall_s": wall}


def hf_conversation(
    model: Any, hf_config: Any, script: Script, answer: int, device: torch.device
) -> list[dict]:
    import inspect

    import transformers

    # newer transformers name the cache argument ``cache``; older ones ``past_key_values``
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    prompt, turns = list(script.system), []
    for tool in script.tool_results:
        prompt += tool + script.ask
        start = time.perf_counter()
        cache = transformers.DynamicCache(config=hf_config)
        ids = torch.tensor([prompt], device=device)
        token = (
            model(ids, **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
            .logits[:, -1:]
            .argmax(-1)
        )
        out = [int(token)]  # reading the token waits for the device
        first = time.perf_counter()
        for _ in range(answer - 1):
            token = model(token, **{cache_arg: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            out.append(token)
        out = [int(t) for t in out]
        end = time.perf_counter()
        turns.append(
            {
                "prompt_tokens": len(prompt),
                "cached_tokens": 0,
                "first_token_ms": (first - start) * 1e3,
                "turn_ms": (end - start) * 1e3,
            }
        )
        prompt += out
        del cache
    return turns


# ---- report ------------------------------------------------------------------------------------
RUNS = (("reuse", "livelm reuse"), ("no_reuse", "reuse off"), ("hf", "HF re-prefill"))


def table(results: dict) -> str:
    runs = [(key, name) for key, name in RUNS if key in results]
    rows = [("turn", "prompt", "cached", *(f"{name} first ms" for _, name in runs))]
    for i, turn in enumerate(results[runs[0][0]]["turns"]):
        cached = results["reuse"]["turns"][i]["cached_tokens"] if "reuse" in results else 0
        rows.append(
            (
                str(i + 1),
                str(turn["prompt_tokens"]),
                str(cached),
                *(f"{results[k]['turns'][i]['first_token_ms']:.1f}" for k, _ in runs),
            )
        )
    for label, pick in (("median", np.median), ("max", np.max)):
        rows.append(
            (
                label,
                "",
                "",
                *(
                    f"{pick([t['first_token_ms'] for t in results[k]['turns']]):.1f}"
                    for k, _ in runs
                ),
            )
        )
    rows.append(("wall s", "", "", *(f"{results[k]['wall_s']:.2f}" for k, _ in runs)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--turns", type=int, default=35)
    p.add_argument("--tool-min", type=int, default=200)
    p.add_argument("--tool-max", type=int, default=2000)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-tokens", type=int, default=0, help="0: 4x the conversation")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--kernel-policy", default="")
    p.add_argument(
        "--runs",
        default="reuse,no_reuse,hf",
        help="which runs, comma-separated, of: reuse, no_reuse, hf",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other runs of an existing results file of the same commit and script "
        "(so runs that together exceed one time limit can be made in two processes)",
    )
    p.add_argument("--cache-dir", default=os.environ.get("LIVELM_HOME", "/tmp/livelm-cache"))
    p.add_argument("--out", default="perf/results")
    args = p.parse_args()
    unknown = set(args.runs.split(",")) - {key for key, _ in RUNS}
    if unknown:
        p.error(f"--runs: unknown {sorted(unknown)}; choose from reuse, no_reuse, hf")
    return args


SCRIPT_ARGS = ("model", "turns", "tool_min", "tool_max", "answer_tokens", "seed")


def merged(path: Path, results: dict) -> dict:
    """``results`` plus the runs of an earlier file at ``path`` measured on the same commit
    with the same script; a mismatch is refused rather than mixed."""
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    meta, old_meta = results["meta"], old["meta"]
    same = old_meta["commit"] == meta["commit"] and all(
        old_meta["args"][k] == meta["args"][k] for k in SCRIPT_ARGS
    )
    if not same:
        raise SystemExit(f"--merge: {path} was measured on another commit or script")
    runs = {key: old[key] for key, _ in RUNS if key in old and key not in results}
    meta["merged_runs"] = sorted(runs)
    return {**old, **runs, **results}


def main() -> int:
    args = parse_args()
    policy = args.kernel_policy or (
        str(Path(__file__).with_name("bench_policy.yaml")) if torch.cuda.is_available() else ""
    )
    config = Config(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        max_batch_tokens=args.max_batch_tokens,
        kernel_policy=policy,
    )
    device, dtype = config.torch_device(), config.torch_dtype()
    binding, model = bind_and_load(config)
    model = dataclasses.replace(model, eos_ids=frozenset())  # every turn answers in full
    script = make_script(args, model.config.vocab_size)
    needed = total_tokens(script, args.answer_tokens)
    if needed > model.decoder.max_positions:
        raise SystemExit(
            f"the conversation takes {needed} tokens; the model holds "
            f"{model.decoder.max_positions}: use fewer --turns or a smaller --tool-max"
        )
    config = msgspec.structs.replace(
        config, kv_cache_tokens=args.kv_cache_tokens or 4 * needed + 4096
    )
    results: dict[str, Any] = {"kernels": binding.chosen()}
    runs = args.runs.split(",")
    print(f"{args.turns} turns, {needed} tokens in all, on {device} in {dtype}", flush=True)
    # on CUDA the warm-up replays every shape (Triton compiles per shape); elsewhere two turns
    warm_turns = None if device.type == "cuda" else 2
    if "reuse" in runs:
        print("livelm with reuse:", flush=True)
        results["reuse"] = uvloop.run(
            engine_turns(model, config, script, args.answer_tokens, warm_turns)
        )
    if "no_reuse" in runs:
        print("livelm with reuse off:", flush=True)
        off = msgspec.structs.replace(config, prefix_cache_conversations=0)
        results["no_reuse"] = uvloop.run(
            engine_turns(model, off, script, args.answer_tokens, warm_turns)
        )
    model_config = model.config
    del model
    gc.collect()
    if "hf" in runs:
        print("transformers, re-prefilling each turn:", flush=True)
        results["hf"] = hf_turns(model_config, script, args.answer_tokens, device, dtype)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results["meta"] = {
        "commit": run_meta.commit(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%d"),
        "total_tokens": needed,
        "args": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{results['meta']['date']}-{gpu.replace(' ', '-').lower()}-agent.json"
    if args.merge:
        results = merged(path, results)
    print(table(results))
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
