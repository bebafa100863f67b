"""Decoding ahead (each decode step launched before the previous one's tokens are read back)
answers exactly as stepping one at a time: same tokens, texts and finish reasons for answers
that end at different steps, by length, stop string, seeded sampling or cancel."""

from __future__ import annotations

import asyncio
import threading

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.daemon.engine.worker import QueryUpdate, StepReport
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.messages import GenerateRequest, InitRequest, TokenEvent
from tests.engine_harness import loaded, run_engine


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("demo-cache")
    return loaded(ensure_demo_model(cache), cache)


def _ahead(scenario):
    """``scenario`` with the worker running ahead even on the CPU, where the engine steps singly
    (a launch there computes the step); the run-ahead logic itself does not depend on the
    device."""

    async def forced(engine: Engine):
        engine.worker.run_ahead = True
        return await scenario(engine)

    return forced


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
    ahead, launched_ahead = run_engine(demo, _ahead(lambda e: _answers(e, stop)))
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

    ahead, launched = run_engine(demo, _ahead(two_tokens))
    single, _ = run_engine(demo, two_tokens, decode_run_ahead=False)
    assert launched == 1 and len(ahead) == 2
    assert ahead == single


def test_the_cpu_steps_singly_even_with_run_ahead_on(demo) -> None:
    """On the CPU a launch computes the step, so running ahead would report each token only
    after the next step: the engine leaves it to CUDA devices, whatever the setting."""

    async def setting(engine: Engine) -> bool:
        return engine.worker.run_ahead

    assert run_engine(demo, setting, decode_run_ahead=True) is False


def test_the_loop_signals_a_report_delivered_after_its_readers_ran(demo) -> None:
    """The worker, with a step in flight, waits for this signal before its next launch: it
    must come once the handles' readers have run, not before."""

    async def scenario(engine: Engine) -> tuple[bool, bool, bool]:
        sid = (await engine.init_session(InitRequest(prompt="Prices:", template="raw"))).session_id
        handle = engine.generate(sid, GenerateRequest(prompt="Next:", max_tokens=3))
        delivered = threading.Event()
        signalled_when_read: list[bool] = []

        async def reader() -> None:
            async for _ in handle:
                signalled_when_read.append(delivered.is_set())
                return

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)  # the reader waits on the handle
        update = QueryUpdate(tokens=[TokenEvent(text="x", token=1)])
        engine._apply_report(StepReport({handle.query_id: update}, [], False, delivered))
        at_once = delivered.is_set()
        await task
        await asyncio.sleep(0)
        handle.cancel()
        return at_once, signalled_when_read[0], delivered.is_set()

    assert run_engine(demo, scenario) == (False, False, True)
