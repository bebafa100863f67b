"""Sampling settings and stop strings, on the demo model through the real engine."""

from __future__ import annotations

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("demo-cache")
    return loaded(ensure_demo_model(cache), cache)


async def _session(engine: Engine) -> str:
    sid = (await engine.init_session(InitRequest(prompt="Prices:", template="raw"))).session_id
    await engine.push(sid, [f"AAPL {180 + i}.5 vol {i * 37}" for i in range(8)])
    return sid


async def _answer(engine: Engine, sid: str, **kw):
    return await engine.generate(sid, GenerateRequest(prompt="Next:", **kw)).result()


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(demo) -> None:
    async def scenario(engine: Engine):
        sid = await _session(engine)
        greedy = await _answer(engine, sid, max_tokens=12)
        top1 = await _answer(engine, sid, max_tokens=12, temperature=1.5, top_k=1, seed=1)
        a = await _answer(engine, sid, max_tokens=12, temperature=1.2, seed=42)
        b = await _answer(engine, sid, max_tokens=12, temperature=1.2, seed=42)
        others = [await _answer(engine, sid, max_tokens=12, temperature=1.2, seed=s) for s in range(5)]
        nucleus = await _answer(engine, sid, max_tokens=12, temperature=1.0, top_p=1e-6, seed=9)
        return greedy, top1, a, b, others, nucleus

    greedy, top1, a, b, others, nucleus = run_engine(demo, scenario)
    assert top1.tokens == greedy.tokens
    assert nucleus.tokens == greedy.tokens  # a tiny nucleus keeps only the top token
    assert a.tokens == b.tokens
    assert any(o.tokens != a.tokens for o in others)  # seeds matter


def test_stop_string_ends_the_answer_before_it(demo) -> None:
    async def scenario(engine: Engine):
        sid = await _session(engine)
        full = await _answer(engine, sid, max_tokens=24)
        text = full.text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        streamed = engine.generate(sid, GenerateRequest(prompt="Next:", max_tokens=24, stop=[stop, "never-there"]))
        pieces = [event.text async for event in streamed]
        return full, stop, await streamed.result(), "".join(pieces)

    full, stop, stopped, joined = run_engine(demo, scenario)
    assert stop and stop in full.text
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]
    assert joined == stopped.text  # streamed pieces never leak the stop string
    assert stopped.tokens == full.tokens[: len(stopped.tokens)]
