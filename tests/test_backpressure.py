"""A full ring holds producers back: with a tiny ring and concurrent pushes from several
sessions, every entry still arrives once, in order (checked through exact answers). The data
also overflows the tiny model's context many times, so window trims interleave with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine
from tests.tiny_models import hf_greedy, make_tiny_checkpoint

SESSIONS, PUSHES, PER_PUSH = 3, 12, 40


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bp-llama"), "llama", seed=5)


def rows(session: int, push: int) -> list[str]:
    return [f"s{session} p{push} r{i} v={session * 1000 + push * 50 + i}" for i in range(PER_PUSH)]


def test_tiny_ring_loses_nothing(folder: Path, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    model = loaded(folder, tmp_path)

    async def producer(engine: Engine, sid: str, index: int) -> list[int]:
        seqs = []
        for p in range(PUSHES):
            seqs.append((await engine.push(sid, rows(index, p))).seq)
            await asyncio.sleep(0)
        return seqs

    async def scenario(engine: Engine):
        sids = [(await engine.init_session(InitRequest(prompt=f"feed {i}", template="raw"))).session_id
                for i in range(SESSIONS)]
        seqs = await asyncio.gather(*(producer(engine, sid, i) for i, sid in enumerate(sids)))
        answers = await asyncio.gather(*(
            engine.generate(sid, GenerateRequest(prompt="last v?", max_tokens=4)).result() for sid in sids
        ))
        assert engine.metrics()["ring_full_waits_total"] > 0  # the ring did fill up
        return seqs, answers, [engine.status(sid) for sid in sids]

    seqs, answers, statuses = run_engine(
        model, scenario, ring_words=1024, kv_cache_tokens=65536, max_batch_tokens=256
    )
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    for i in range(SESSIONS):
        assert seqs[i] == [PER_PUSH * (p + 1) for p in range(PUSHES)]
        st = statuses[i]
        assert st.data_seq == st.ingested_seq == PUSHES * PER_PUSH and st.pending_tokens == 0
        assert st.dropped_entries == st.first_seq - 1 > 0
        assert st.entries == PUSHES * PER_PUSH - st.dropped_entries
        every_row = [row for p in range(PUSHES) for row in rows(i, p)]
        ids = tok(f"feed {i}")["input_ids"]
        for row in every_row[st.first_seq - 1 :]:
            ids += tok.encode(row + "\n", add_special_tokens=False)
        assert st.context_tokens == len(ids) <= st.window
        question = ids + tok.encode("last v?", add_special_tokens=False)
        assert answers[i].tokens == hf_greedy(folder, question, 4)[: len(answers[i].tokens)]
        assert len(answers[i].tokens) == 4 or answers[i].finish_reason == "stop"


def test_a_push_reaches_the_worker_whole(folder: Path, tmp_path: Path) -> None:
    """A push's records go to the ring in one write when they fit, so the worker wakes once
    and ingests them in one step, not the first record alone and then the rest."""
    model = loaded(folder, tmp_path)

    async def steps_for_one_push(engine: Engine) -> int:
        sid = (await engine.init_session(InitRequest(prompt="feed", template="raw"))).session_id
        await ingested(engine, sid, (await engine.push(sid, rows(0, 0)[:2])).seq)
        before = engine.metrics()["worker_steps_total"]
        await ingested(engine, sid, (await engine.push(sid, rows(0, 1))).seq)
        return engine.metrics()["worker_steps_total"] - before

    assert run_engine(model, steps_for_one_push, max_batch_tokens=4096) == 1


def test_steps_are_counted_as_graph_replays_or_eager(folder: Path, tmp_path: Path) -> None:
    """The metrics split the worker's steps into graph replays and eager launches (the host
    cost of an eager step is what the data graphs remove); on the CPU every step is eager."""
    model = loaded(folder, tmp_path)

    async def counts(engine: Engine) -> dict[str, float]:
        sid = (await engine.init_session(InitRequest(prompt="feed", template="raw"))).session_id
        await ingested(engine, sid, (await engine.push(sid, rows(0, 0))).seq)
        await engine.generate(sid, GenerateRequest(prompt="last v?", max_tokens=3)).result()
        return engine.metrics()

    m = run_engine(model, counts, max_batch_tokens=4096)
    assert m["worker_graph_steps_total"] == 0
    assert m["worker_eager_steps_total"] == m["worker_steps_total"] >= 3


async def ingested(engine: Engine, sid: str, seq: int) -> None:
    events = engine.subscribe(sid, frozenset({"data"}))
    try:
        while engine.status(sid).ingested_seq < seq:
            await events.__anext__()
    finally:
        events.close()
