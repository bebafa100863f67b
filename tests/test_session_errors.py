"""A session whose data the worker cannot compute says so in its status and fails its queries;
other sessions keep working.

Nothing a client sends can make a step fail (the tokenizer only makes ids the model has, and
the loader checks that), so the failing input is put where the worker reads it: an accepted
entry holding a token id past the model's vocabulary, through the engine's own accept path.
The model then really fails on it (the embedding lookup raises).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.errors import InternalError
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine

QUESTION = GenerateRequest(prompt="What happened?", max_tokens=3)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo"))


async def open_session(engine: Engine, entries: list[str]) -> str:
    sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
    await engine.push(sid, entries)
    return sid


def test_failed_session_is_reported_and_fails_its_queries(
    demo_folder: Path, tmp_path: Path
) -> None:
    model = loaded(demo_folder, tmp_path)
    past_vocab = model.config.vocab_size + 5

    async def scenario(engine: Engine):
        good = await open_session(engine, ["AAPL 1", "AAPL 2"])
        bad = await open_session(engine, ["MSFT 1"])
        # the bad entry and more good data are queued together, so they can share a step
        await engine._accept(engine.sessions[bad], [[past_vocab]])
        await engine.push(good, ["AAPL 3"])
        waiting = engine.generate(bad, QUESTION)  # needs the bad entry: waits for it
        with pytest.raises(InternalError) as waited:
            await waiting.result()
        status = engine.status(bad)
        with pytest.raises(InternalError) as refused:
            engine.generate(bad, QUESTION)
        with pytest.raises(InternalError) as push_refused:
            await engine.push(bad, ["MSFT 2"])
        assert engine.status(bad).data_seq == 2  # the refused push took no seq
        answer = await engine.generate(good, QUESTION).result()
        await engine.push(good, ["AAPL 4"])
        later = await engine.generate(good, QUESTION).result()
        good_status = engine.status(good)
        await engine.close_session(bad)
        assert "cannot take data" in str(push_refused.value)
        return waited.value, status, refused.value, answer, later, good_status

    waited, status, refused, answer, later, good_status = run_engine(model, scenario)
    assert status.error is not None and "IndexError" in status.error
    assert status.data_seq == 2 and status.ingested_seq < 2  # it never got past the bad entry
    assert "cannot answer" in str(waited) and status.error in str(waited)
    assert "cannot answer" in str(refused) and "close it" in str(refused)
    assert answer.data_seq == 3 and later.data_seq == 4
    assert good_status.error is None and good_status.ingested_seq == 4


def test_queries_waiting_on_a_session_fail_when_it_fails(demo_folder: Path, tmp_path: Path) -> None:
    """Several queries already waiting for the data all end with the error, none hangs."""
    model = loaded(demo_folder, tmp_path)
    past_vocab = model.config.vocab_size + 1

    async def scenario(engine: Engine):
        sid = await open_session(engine, ["AAPL 1"])
        await engine._accept(engine.sessions[sid], [[1, 2, past_vocab]])
        handles = [engine.generate(sid, QUESTION) for _ in range(3)]
        handles.append(engine.generate(sid, GenerateRequest(prompt="Up?", choices=["up", "down"])))
        return await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)

    results = run_engine(model, scenario)
    assert len(results) == 4
    assert all(isinstance(r, InternalError) and "cannot answer" in str(r) for r in results)
