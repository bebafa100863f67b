"""Decoding ahead (each decode step launched before the previous one's tokens are read back)
answers exactly as stepping one at a time: same tokens, texts and finish reasons for answers
that end at different steps, by length, stop string, seeded sampling or cancel."""

from __future__ import annotations

import asyncio

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("demo-cache")
    return loaded(ensure_demo_model(cache), cache)


def _requests(stop: str) -> list[GenerateRequest]:
    return [
        GenerateRequest(prompt="Next:", max_tokens=1),
        GenerateRequest(prompt="Next:", max_tokens=2),
        GenerateRequest(prompt="Then:", max_tokens=9),
        GenerateRequest(prompt="Next:", max_tokens=17, stop=[stop]),
        GenerateRequest(prompt="Why:", max_tokens=13, temperature=1.1, seed=7),
        GenerateRequest(prompt="Why:", max_tokens=21, temperature=0.9, top_k=20, top_p=0.9, seed=3),
    ]


async def _answers(engine: Engine, stop: str) -> tuple[list, int]:
    sid = (await engine.init_session(InitRequest(prompt="Prices:", template="raw"))).session_id
    await engine.push(sid, [f"AAPL {180 + i}.5 vol {i * 37}" for i in range(8)])
    handles = [engine.generate(sid, r) for r in _requests(stop)]  # one loop turn: one batch
    done = await asyncio.gather(*(h.result() for h in handles))
    cancelled = engine.generate(sid, GenerateRequest(prompt="Long:", max_tokens=40))
    async for _ in cancelled:
        cancelled.cancel()
        break
    after = await engine.generate(sid, GenerateRequest(prompt="Then:", max_tokens=9)).result()
    answers = [(d.tokens, d.text, d.finish_reason) for d in [*done, after]]
    return answers, engine.worker.steps_ahead


def _stop_string(demo) -> str:
    async def scenario(engine: Engine) -> str:
        sid = (await engine.init_session(InitRequest(prompt="Prices:", template="raw"))).session_id
        await engine.push(sid, [f"AAPL {180 + i}.5 vol {i * 37}" for i in range(8)])
        text = (await engine.generate(sid, GenerateRequest(prompt="Next:", max_tokens=17)).result()).text
        return text[len(text) // 2 : len(text) // 2 + 2]

    return run_engine(demo, scenario, decode_run_ahead=False)


def test_decoding_ahead_answers_as_stepping_singly(demo) -> None:
    stop = _stop_string(demo)
    ahead, launched_ahead = run_engine(demo, lambda e: _answers(e, stop), decode_run_ahead=True)
    single, launched_single = run_engine(demo, lambda e: _answers(e, stop), decode_run_ahead=False)
    assert launched_ahead > 0 and launched_single == 0
    assert ahead == single
    reasons = [reason for _, _, reason in single]
    assert reasons.count("length") >= 4 and "stop" in reasons  # answers end at different steps


def test_the_second_token_is_launched_from_the_question_step(demo) -> None:
    """A question's own step is the first of the run: the step of its second token is
    launched before its first token is read back, and the answer is as stepping singly."""

    async def two_tokens(engine: Engine) -> tuple[list[int], int]:
        sid = (await engine.init_session(InitRequest(prompt="Prices:", template="raw"))).session_id
        await engine.push(sid, [f"AAPL {180 + i}.5" for i in range(4)])
        done = await engine.generate(sid, GenerateRequest(prompt="Next:", max_tokens=2)).result()
        return done.tokens, engine.worker.steps_ahead

    ahead, launched = run_engine(demo, two_tokens, decode_run_ahead=True)
    single, _ = run_engine(demo, two_tokens, decode_run_ahead=False)
    assert launched == 1 and len(ahead) == 2
    assert ahead == single
