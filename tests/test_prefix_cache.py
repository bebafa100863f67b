"""Completions with KV reuse across requests (the prefix cache), checked against transformers.

Prompts are raw token ids; each answer must equal transformers' greedy continuation of the
whole prompt, with reuse on and off, and ``cached_tokens`` must be exactly the reused prefix.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from livelm.daemon.engine.conversations import Completion
from livelm.daemon.engine.engine import Engine
from livelm.protocol.errors import InvalidRequest, Overloaded
from livelm.protocol.messages import DoneReply, GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine, wait_until
from tests.tiny_models import hf_greedy, make_tiny_checkpoint

ANSWER = 6
TURNS = 4


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def random_tokens(seed: int, count: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, 400, count).tolist()


def greedy(max_tokens: int = ANSWER) -> GenerateRequest:
    return GenerateRequest(prompt="", max_tokens=max_tokens, temperature=0.0)


def hf_answer(folder: Path, prompt: list[int], eos: frozenset[int], n: int = ANSWER) -> list[int]:
    out = hf_greedy(folder, prompt, n)
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


async def answer(
    engine: Engine, prompt: list[int], n: int = ANSWER
) -> tuple[Completion, list[int]]:
    completion = await engine.complete(prompt, greedy(n))
    return completion, (await completion.handle.result()).tokens


async def conversation(engine: Engine) -> list[tuple[list[int], list[int], int]]:
    """A multi-turn conversation: each prompt is the previous prompt + answer + a tool result."""
    prompt, turns = random_tokens(0, 40), []
    for turn in range(TURNS):
        completion, tokens = await answer(engine, prompt)
        assert completion.prompt_tokens == len(prompt)
        turns.append((list(prompt), tokens, completion.cached_tokens))
        prompt = prompt + tokens + random_tokens(turn + 1, 25 + 10 * turn)
    return turns


def test_multi_turn_equals_hf_with_and_without_reuse(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    reused = run_engine(model, conversation)
    fresh = run_engine(model, conversation, prefix_cache_conversations=0)
    previous = None
    for (prompt, tokens, cached), (_, fresh_tokens, fresh_cached) in zip(
        reused, fresh, strict=True
    ):
        assert tokens == fresh_tokens == hf_answer(folder, prompt, model.eos_ids)
        # the previous turn's conversation holds its prompt but the last token
        assert cached == (0 if previous is None else len(previous) - 1)
        assert fresh_cached == 0
        previous = prompt


def test_partial_matches_reuse_up_to_the_divergence(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    base = random_tokens(7, 70)
    prompts = {
        "base": base,
        "diverges": base[:37] + random_tokens(8, 20),  # branches at 37
        "shorter": base[:20],  # a prefix of a conversation: branches at 19
        "same": list(base),  # holds base[:-1] already
        "extends_branch": base[:37] + random_tokens(8, 20) + random_tokens(9, 5),
    }
    expected_cached = {"base": 0, "diverges": 37, "shorter": 19, "same": 69, "extends_branch": 56}

    async def scenario(engine: Engine) -> dict[str, tuple[int, list[int]]]:
        out = {}
        for name, prompt in prompts.items():
            completion, tokens = await answer(engine, prompt)
            out[name] = (completion.cached_tokens, tokens)
        metrics = engine.metrics()
        assert metrics["prefix_cache_hits_total"] == 4
        assert metrics["prefix_cache_misses_total"] == 1
        assert metrics["prefix_cache_reused_tokens_total"] == sum(expected_cached.values())
        return out

    for name, (cached, tokens) in run_engine(model, scenario).items():
        assert cached == expected_cached[name], name
        assert tokens == hf_answer(folder, prompts[name], model.eos_ids), name


def test_eviction_under_a_tiny_kv_budget(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    prompts = [random_tokens(20 + i, 150) for i in range(5)]
    long_prompt = random_tokens(30, 120)

    async def scenario(engine: Engine) -> tuple[list[list[int]], list[int], float]:
        # a long answer runs while other prompts need its blocks: its conversation stays
        running = await engine.complete(long_prompt, greedy(40))
        others = [(await answer(engine, p))[1] for p in prompts]
        again = [(await answer(engine, p))[1] for p in prompts[:2]]
        return others + again, (await running.handle.result()).tokens, engine.metrics()

    # 64 blocks of 16 tokens: room for about three 150-token conversations at a time
    outs, long_tokens, metrics = run_engine(model, scenario, kv_cache_tokens=1024, block_size=16)
    assert metrics["prefix_cache_evictions_total"] > 0
    for prompt, tokens in zip(prompts + prompts[:2], outs, strict=True):
        assert tokens == hf_answer(folder, prompt, model.eos_ids)
    assert long_tokens == hf_answer(folder, long_prompt, model.eos_ids, 40)


def test_making_room_never_evicts_the_conversation_being_extended(
    folder: Path, tmp_path: Path
) -> None:
    model = loaded(folder, tmp_path)
    first, others = random_tokens(90, 250), [random_tokens(91 + i, 250) for i in range(2)]
    longer = first + random_tokens(95, 250)

    async def scenario(engine: Engine) -> tuple[Completion, list[int], float]:
        for prompt in [first, *others]:  # the first is now the least recently used
            await answer(engine, prompt)
        # extending it needs more blocks than are free: another conversation must go
        completion, tokens = await answer(engine, longer)
        return completion, tokens, engine.metrics()["prefix_cache_evictions_total"]

    completion, tokens, evictions = run_engine(model, scenario, kv_cache_tokens=1024, block_size=16)
    assert evictions > 0
    assert completion.cached_tokens == len(first) - 1
    assert tokens == hf_answer(folder, longer, model.eos_ids)


def test_conversation_count_limit_evicts_least_recently_used(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    prompts = [random_tokens(40 + i, 30) for i in range(4)]

    async def scenario(engine: Engine) -> tuple[dict[str, float], int, int]:
        for p in prompts:
            await answer(engine, p)
        await wait_until(lambda: engine.metrics()["prefix_cache_conversations"] <= 2)
        oldest, _ = await answer(engine, prompts[0] + [5])  # evicted: nothing to reuse
        newest, _ = await answer(engine, prompts[-1] + [5])  # kept: its prompt but the last
        return engine.metrics(), oldest.cached_tokens, newest.cached_tokens

    metrics, oldest, newest = run_engine(model, scenario, prefix_cache_conversations=2)
    assert metrics["prefix_cache_evictions_total"] >= 2
    assert metrics["prefix_cache_conversations"] <= 3  # the limit + the one answered last
    assert (oldest, newest) == (0, len(prompts[-1]) - 1)


def test_sessions_take_their_blocks_back_from_idle_conversations(
    folder: Path, tmp_path: Path
) -> None:
    model = loaded(folder, tmp_path)
    entries = [f"AAPL t={i} o=18{i % 10}.5 c=18{(i * 7) % 10}.25" for i in range(40)]

    async def scenario(engine: Engine) -> tuple[float, float, int]:
        for i in range(3):  # idle conversations holding most of the pool
            await answer(engine, random_tokens(80 + i, 250))
        held = engine.metrics()["prefix_cache_blocks_reserved"]
        sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
        for i in range(0, len(entries), 10):
            await engine.push(sid, entries[i : i + 10])
        done = await generate_retrying(engine, sid, GenerateRequest(prompt="Up?", max_tokens=4))
        return held, engine.metrics()["prefix_cache_evictions_total"], done.data_seq

    held, evictions, data_seq = run_engine(model, scenario, kv_cache_tokens=1024, block_size=16)
    assert held > 32  # more than half the pool was theirs
    assert evictions > 0
    assert data_seq == len(entries)


def test_concurrent_requests_on_one_conversation(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    first = random_tokens(50, 60)

    async def scenario(engine: Engine) -> tuple[list[int], list[tuple[Completion, list[int]]]]:
        _, tokens = await answer(engine, first)
        history = first + tokens
        follow = [
            history + random_tokens(51, 12),
            history + random_tokens(52, 9),
            history + random_tokens(51, 12),  # the same prompt as the first, at once
        ]
        results = await asyncio.gather(*(answer(engine, p) for p in follow))
        return follow, list(results)

    follow, results = run_engine(model, scenario)
    for prompt, (completion, tokens) in zip(follow, results, strict=True):
        assert tokens == hf_answer(folder, prompt, model.eos_ids)
        assert completion.cached_tokens >= len(first) - 1
    assert results[0][1] == results[2][1]


def test_completion_over_a_session_continues_its_context(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    question = "What moved?"

    async def scenario(engine: Engine) -> tuple[Completion, list[int], list[int], int]:
        init = InitRequest(prompt="Watch the feed.", template="raw")
        sid = (await engine.init_session(init)).session_id
        await engine.push(sid, ["AAPL up 3", "MSFT down 1"])
        ids = model.tokenizer.encode(question)  # the raw layout adds nothing after a question
        completion = await engine.complete(ids, greedy(), session_id=sid)
        tokens = (await completion.handle.result()).tokens
        generated = await engine.generate(
            sid, GenerateRequest(prompt=question, max_tokens=ANSWER)
        ).result()
        return completion, tokens, generated.tokens, engine.status(sid).context_tokens

    completion, tokens, generated, context = run_engine(model, scenario)
    assert completion.cached_tokens == context > 0
    assert completion.prompt_tokens == context + len(model.tokenizer.encode(question))
    assert tokens == generated


def test_bad_prompts_are_refused_and_the_engine_keeps_working(folder: Path, tmp_path: Path) -> None:
    model = loaded(folder, tmp_path)
    vocab = model.config.vocab_size
    prompt = random_tokens(70, 20)
    bad = {
        "empty": ([], ANSWER),
        "id past the vocabulary": ([1, vocab], ANSWER),
        "negative id": ([-1, 2], ANSWER),
        "past the context": (random_tokens(71, 200), 100),
    }

    async def scenario(engine: Engine) -> list[int]:
        for name, (tokens, max_tokens) in bad.items():
            with pytest.raises(InvalidRequest):
                await engine.complete(tokens, greedy(max_tokens))
                pytest.fail(name)
        return (await answer(engine, prompt))[1]

    tokens = run_engine(model, scenario, max_context_tokens=256)
    assert tokens == hf_answer(folder, prompt, model.eos_ids)


async def generate_retrying(engine: Engine, sid: str, req: GenerateRequest) -> DoneReply:
    """A query told ``overloaded`` while conversations give their blocks back retries, as a
    client would."""
    for _ in range(100):
        try:
            return await engine.generate(sid, req).result()
        except Overloaded:
            await asyncio.sleep(0.01)
    raise AssertionError("the query never found room")


