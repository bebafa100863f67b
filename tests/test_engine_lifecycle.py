"""A real engine's sessions and queries over their lifetime: admission (concurrent inits of
one id, the session limit, the part of the KV pool sessions leave to queries, blocks pinned
while queries read a closed or trimmed session), status while data is queued, long questions
tokenized off the loop, flash rounds retried for KV room, and how the drain and closes end
answers and subscriptions."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import weakref
from pathlib import Path

import pytest

from livelm.daemon.engine.admission import BlockBudget
from livelm.daemon.engine.engine import Engine
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.errors import ContextFull, InvalidRequest, Overloaded
from livelm.protocol.messages import FlashSpec, GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine, wait_until

# long enough that the engine tokenizes it on a thread (its init then yields to the loop), and
# about 6k tokens of the demo tokenizer, within its 8k context
LONG_PROMPT = "ab " * 6000


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo"))


def test_concurrent_inits_of_one_id_open_it_once(demo_folder: Path, tmp_path: Path) -> None:
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        init = InitRequest(prompt=LONG_PROMPT, template="raw", session_id="desk")
        results = await asyncio.gather(
            engine.init_session(init), engine.init_session(init), return_exceptions=True
        )
        opened = len(engine.sessions)
        await engine.close_session("desk")
        return results, opened, engine.budget.reserved, engine.budget.held_by_sessions

    results, opened, reserved, held = run_engine(model, scenario, kv_cache_tokens=32768)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], InvalidRequest), results
    assert "already exists" in str(refused[0])
    assert opened == 1
    assert (reserved, held) == (0, 0)  # nothing is left behind once it is closed


def test_the_session_limit_holds_under_concurrent_inits(demo_folder: Path, tmp_path: Path) -> None:
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        init = InitRequest(prompt=LONG_PROMPT, template="raw")
        results = await asyncio.gather(
            *(engine.init_session(init) for _ in range(3)), return_exceptions=True
        )
        return results, len(engine.sessions)

    results, opened = run_engine(model, scenario, kv_cache_tokens=32768, max_sessions=2)
    assert opened == 2
    assert [type(r) for r in results].count(Overloaded) == 1, results


def test_a_session_that_filled_the_cache_can_still_be_asked(
    demo_folder: Path, tmp_path: Path
) -> None:
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        # a window of the whole context: the default leaves an eighth for questions, this
        # session's data alone would take every block
        init = InitRequest(prompt="Feed.", template="raw", window=engine.max_context)
        sid = (await engine.init_session(init)).session_id
        entries = [f"tick {i} price {100 + i} volume {i * 7}" for i in range(8)]
        pushes = 0
        with pytest.raises(ContextFull, match="stay free for queries"):
            for _ in range(200):
                await engine.push(sid, entries)
                pushes += 1
        answer = await engine.generate(sid, GenerateRequest(prompt="Last?", max_tokens=4)).result()
        return pushes, answer, engine.status(sid)

    pushes, answer, status = run_engine(model, scenario, kv_cache_tokens=2048)
    assert pushes > 3  # the pool did fill from data
    assert answer.tokens and answer.data_seq == status.data_seq == pushes * 8


def test_a_query_that_sessions_leave_no_room_for_is_not_told_to_retry() -> None:
    budget = BlockBudget(total_blocks=100, block_size=16)
    assert budget.query_reserve == 12  # an eighth of a small pool
    budget.grow_live_session(0, 80)
    with pytest.raises(ContextFull, match="stay free for queries"):
        budget.grow_live_session(80, 89)
    budget.grow_session(0, 10)  # a kept conversation may use the reserve: it can be evicted
    with pytest.raises(Overloaded):  # 10 free now, 20 once the conversation goes
        budget.reserve_query(15)
    with pytest.raises(ContextFull, match="ask for fewer tokens"):  # waiting never gives 21
        budget.reserve_query(21)
    budget.release(10)
    budget.reserve_query(15)
    # queries hold what a session's growth needs for now: retry, not full
    with pytest.raises(Overloaded, match="until running queries end"):
        budget.grow_live_session(80, 88)
    budget.release_live_session(80)
    assert (budget.reserved, budget.held_by_sessions) == (15, 0)


def test_status_counts_accepted_data_not_yet_ingested(demo_folder: Path, tmp_path: Path) -> None:
    model = loaded(demo_folder, tmp_path)
    entries = [f"tick {i} price {100 + i} volume {i * 7} side buy venue X" for i in range(40)]
    entry_tokens = sum(len(t) for t in model.tokenizer.encode_batch(entries))

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
        await engine.push(sid, entries)
        early = engine.status(sid)  # the worker's reports have not reached the loop yet
        await engine.generate(sid, GenerateRequest(prompt="Last?", max_tokens=1)).result()
        return early, engine.status(sid)

    early, late = run_engine(model, scenario)  # 64-token steps: ingesting takes many
    assert early.data_seq == 40 and early.ingested_seq == 0
    assert early.pending_tokens >= entry_tokens  # it read 0 while the data sat in the ring
    assert late.ingested_seq == 40 and late.pending_tokens == 0


def test_answers_unfinished_at_the_drains_end_get_an_error(
    demo_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = loaded(demo_folder, tmp_path)
    caplog.set_level(logging.WARNING, logger="livelm.engine")

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
        handle = engine.generate(sid, GenerateRequest(prompt="Tell a story.", max_tokens=1000))
        first = await anext(aiter(handle))  # the answer is under way
        await engine.stop(drain_timeout=0.0)  # no time to finish 1000 tokens
        with pytest.raises(Overloaded, match="shut down before this answer finished"):
            await asyncio.wait_for(handle.result(), 10.0)
        return first, engine.budget.reserved - engine.budget.held_by_sessions

    first, query_blocks = run_engine(model, scenario)
    assert first.text is not None
    assert query_blocks == 0  # the query's blocks were given back
    cut = [r for r in caplog.records if getattr(r, "cut_off_queries", None) == 1]
    assert cut and cut[0].levelno == logging.WARNING  # the operator learns answers were cut


def test_a_long_question_is_tokenized_off_the_event_loop(demo_folder: Path, tmp_path: Path) -> None:
    model = loaded(demo_folder, tmp_path)
    long = GenerateRequest(prompt="ab " * 6000, max_tokens=3)  # 18k characters, 6k tokens

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
        ran: list[str] = []
        other = asyncio.get_running_loop().call_soon(ran.append, "other work")
        handle = await engine.ask(sid, long)
        served_meanwhile = list(ran)  # the loop ran other callbacks while the prompt was split
        other.cancel()
        asked = await handle.result()
        direct = await engine.generate(sid, long).result()  # on the loop, the same tokens
        short = await (await engine.ask(sid, GenerateRequest(prompt="Up?", max_tokens=2))).result()
        return served_meanwhile, asked, direct, short

    served_meanwhile, asked, direct, short = run_engine(model, scenario)
    assert served_meanwhile == ["other work"]
    assert asked.tokens == direct.tokens and asked.usage == direct.usage
    assert short.tokens


def test_subscriptions_end_saying_why(demo_folder: Path, tmp_path: Path) -> None:
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        first = (await engine.init_session(InitRequest(prompt="a", template="raw"))).session_id
        second = (await engine.init_session(InitRequest(prompt="b", template="raw"))).session_id
        closed, stopped = engine.subscribe(first, frozenset()), engine.subscribe(second, frozenset())
        await engine.close_session(first)
        await engine.stop(drain_timeout=0.0)
        ends = []
        for subscription in (closed, stopped):
            assert [event async for event in subscription] == []
            ends.append(subscription.end_reason)
        return ends

    assert run_engine(model, scenario) == ["session closed", "shutdown"]


async def _fill(engine: Engine, sid: str, rounds: int = 100) -> BaseException | None:
    """Pushes ticks into ``sid`` until the daemon refuses one (what it refused with)."""
    entries = [f"tick {i} price {100 + i} volume {i * 7}" for i in range(8)]
    for _ in range(rounds):
        try:
            await engine.push(sid, entries)
        except (ContextFull, Overloaded) as exc:
            return exc
    return None


def test_closing_a_session_keeps_the_blocks_its_running_query_reads(
    demo_folder: Path, tmp_path: Path
) -> None:
    """The KV budget once freed a closed session's blocks while a query forked from it still
    read them; new sessions then took them and the worker's pool ran dry mid-step."""
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        init = InitRequest(prompt="Feed A.", template="raw", window=engine.max_context // 2)
        first = (await engine.init_session(init)).session_id
        await engine.push(first, [f"tick {i} price {100 + i}" for i in range(120)])
        handle = engine.generate(first, GenerateRequest(prompt="Story?", max_tokens=600))
        await anext(aiter(handle))  # forked and answering
        await engine.close_session(first)
        held = engine.budget.reserved - engine.budget.held_by_sessions
        second = (await engine.init_session(InitRequest(prompt="Feed B.", template="raw"))).session_id
        refused = await _fill(engine, second)
        answer = await handle.result()
        await engine.generate(second, GenerateRequest(prompt="Up?", max_tokens=2)).result()
        leftover = engine.budget.reserved - engine.budget.held_by_sessions
        return held, refused, answer, engine.status(second), leftover

    held, refused, answer, status, leftover = run_engine(model, scenario, kv_cache_tokens=4096)
    assert held > 0  # the closed session's blocks stayed reserved for its query
    assert refused is not None  # the pool did run short for the new session
    assert answer.finish_reason in ("stop", "length") and status.error is None
    assert leftover == 0  # with every query done, only the live session holds blocks


def test_a_window_trim_keeps_the_blocks_a_running_query_reads(
    demo_folder: Path, tmp_path: Path
) -> None:
    """A trim rebuilds the session's context in new blocks while a query forked before it
    still reads the old ones: both must fit, or the push is told to retry."""
    model = loaded(demo_folder, tmp_path)
    ticks = [f"tick {i} price {100 + i} volume {i * 7}" for i in range(8)]

    async def scenario(engine: Engine):
        window = engine.max_context * 7 // 10  # old and rebuilt context cannot both fit
        init = InitRequest(prompt="Feed.", template="raw", window=window)
        sid = (await engine.init_session(init)).session_id
        while engine.sessions[sid].data_tokens < window - 200:
            await engine.push(sid, ticks)
        handle = engine.generate(sid, GenerateRequest(prompt="Story?", max_tokens=300))
        await anext(aiter(handle))
        outcomes = []
        while engine.status(sid).dropped_entries == 0:  # push until the window trims
            try:
                await engine.push(sid, ticks)
                outcomes.append("accepted")
            except Overloaded:
                outcomes.append("retry")
                await asyncio.sleep(0.05)
        answer = await handle.result()
        after = await engine.generate(sid, GenerateRequest(prompt="Up?", max_tokens=2)).result()
        return outcomes, answer, after, engine.status(sid)

    outcomes, answer, after, status = run_engine(model, scenario, kv_cache_tokens=2048)
    assert "retry" in outcomes  # the trim had to wait for the query
    assert outcomes[-1] == "accepted" and status.dropped_entries > 0  # then it went through
    assert answer.finish_reason in ("stop", "length")
    assert status.error is None and after.data_seq == status.data_seq


def test_a_closed_session_is_let_go(demo_folder: Path, tmp_path: Path) -> None:
    """Closed sessions (and the entries they retained) once stayed referenced forever."""
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
        await engine.push(sid, ["tick 1", "tick 2"])
        await engine.generate(sid, GenerateRequest(prompt="Up?", max_tokens=2)).result()
        ref = weakref.ref(engine.sessions[sid])
        await engine.close_session(sid)
        gc.collect()
        return ref()

    assert run_engine(model, scenario) is None


def _longest_fitting(engine: Engine, sid: str, question: int = 8) -> int:
    """The largest max_tokens whose query the free KV blocks (and the context) still hold."""
    context = engine.sessions[sid].context_tokens
    budget = engine.budget
    longest = min(engine.max_context - context - question, engine.config.max_new_tokens)
    while budget.query_blocks(context, question + longest) > budget.available:
        longest -= 1
    return longest


def test_a_flash_round_without_kv_room_is_asked_again(demo_folder: Path, tmp_path: Path) -> None:
    """A flash round refused for want of KV room was dropped: the answer stayed stale until
    the next data. It is asked again once room frees."""
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        flash = [FlashSpec(query="Up or down?", max_tokens=3)]
        init = InitRequest(prompt="Feed F.", template="raw", flash=flash)
        watched = (await engine.init_session(init)).session_id
        await engine.push(watched, ["tick 1 price 100"])
        events = engine.subscribe(watched, frozenset({"flash"}))
        await anext(events)  # the first round's answer
        await wait_until(lambda: not engine.metrics()["flash_rounds_inflight"], 60.0)  # and any after it
        filler = (await engine.init_session(InitRequest(prompt="B.", template="raw"))).session_id
        await _fill(engine, filler)
        long = GenerateRequest(prompt="Story?", max_tokens=_longest_fitting(engine, filler))
        handle = engine.generate(filler, long)  # takes what queries could still use
        await anext(aiter(handle))
        seq = (await engine.push(watched, ["t"])).seq  # fits the watched session's spare block
        await handle.result()
        # answers are published only when their text changes: read the cached one instead
        await wait_until(lambda: engine.flash_answers(watched)[0].data_seq >= seq, 60.0)
        return engine.counters["flash_rounds_retried_total"], seq

    retried, seq = run_engine(model, scenario, kv_cache_tokens=4096)
    assert retried > 0  # the round found no room at first, and its answer came after all


def test_a_long_answer_keeps_the_worker_seen_as_alive(demo_folder: Path, tmp_path: Path) -> None:
    """Decode-ahead steps a whole answer inside one worker turn: each step must count as
    progress, or the supervisor takes a long answer for a stuck worker (and under systemd's
    watchdog the daemon is killed mid-answer)."""
    model = dataclasses.replace(loaded(demo_folder, tmp_path), eos_ids=frozenset())

    async def scenario(engine: Engine):
        engine.worker.run_ahead = True  # the engine steps singly on the CPU; the logic is shared
        sid = (await engine.init_session(InitRequest(prompt="Feed.", template="raw"))).session_id
        loop = asyncio.get_running_loop()
        begun = loop.time()
        task = asyncio.ensure_future(
            engine.generate(sid, GenerateRequest(prompt="Story?", max_tokens=400)).result()
        )
        ages = []
        while not task.done():
            ages.append(engine.worker_turn_age())
            await asyncio.sleep(0.001)
        await task
        return max(ages), loop.time() - begun, engine.worker.steps_ahead

    oldest, wall, ahead = run_engine(model, scenario)
    assert ahead > 100  # the answer was stepped ahead, within few turns
    assert oldest < wall / 4, (oldest, wall)


def test_status_never_goes_back_through_a_window_rebuild(demo_folder: Path, tmp_path: Path) -> None:
    """A push past the window makes the worker recompute the retained entries: status, read
    all along, must not report fewer ingested entries than it already did."""
    model = loaded(demo_folder, tmp_path)

    async def scenario(engine: Engine):
        init = InitRequest(prompt="Feed.", template="raw", window=600)
        sid = (await engine.init_session(init)).session_id
        seen, trimmed_pending = [], []
        for burst in range(12):
            entries = [f"tick {burst}.{i} price {100 + i} volume {i * 7}" for i in range(8)]
            dropped = engine.status(sid).dropped_entries
            last = (await engine.push(sid, entries)).seq
            after = engine.status(sid)
            if after.dropped_entries > dropped:  # this push trims: everything kept is redone
                trimmed_pending.append(after.pending_tokens >= engine.sessions[sid].data_tokens)
            while (status := engine.status(sid)).ingested_seq < last:
                seen.append(status.ingested_seq)
                await asyncio.sleep(0.0005)
            seen.append(status.ingested_seq)
        return seen, trimmed_pending

    seen, trimmed_pending = run_engine(model, scenario)
    assert trimmed_pending and all(trimmed_pending)  # the window was passed, and said so
    assert seen == sorted(seen)
