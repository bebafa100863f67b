"""The scheduler's step plans: questions first, and session backlogs cut into even chunks."""

from __future__ import annotations

import math

import pytest

from livelm.daemon.engine.scheduler import Scheduler, even_chunk
from livelm.daemon.engine.sequence import Phase, QueryState, SessionState


def session(slot: int, tokens: int, computed: int = 0) -> SessionState:
    return SessionState(tokens=list(range(tokens)), slot=slot, num_computed=computed)


def ingest(scheduler: Scheduler, sessions: list[SessionState]) -> list[list[int]]:
    """Plans steps until every session is computed: each step's chunk lengths."""
    steps = []
    while any(s.pending for s in sessions):
        chunks = scheduler.plan(sessions, [], set())
        if not chunks:
            raise AssertionError("pending data but an empty plan")
        for ch in chunks:
            if ch.start != ch.seq.num_computed:
                raise AssertionError(f"chunk starts at {ch.start}, not {ch.seq.num_computed}")
            ch.seq.num_computed += ch.length
        steps.append([ch.length for ch in chunks])
    return steps


@pytest.mark.parametrize("pending,budget", [(5205, 4096), (4097, 4096), (5205, 2048),
                                            (100_000, 2048), (2049, 2048), (600, 512)])
def test_a_backlog_takes_the_fewest_steps_in_even_chunks(pending: int, budget: int) -> None:
    steps = ingest(Scheduler(budget), [session(0, pending)])
    lengths = [step[0] for step in steps]
    assert sum(lengths) == pending
    assert len(steps) == math.ceil(pending / budget)
    assert max(lengths) <= budget
    # no short remainder: rounding each share up to a KV block leaves chunks within two blocks
    assert max(lengths) - min(lengths) < 2 * 64


def test_four_thousand_and_one_tokens_are_two_halves_not_a_budget_and_one() -> None:
    assert ingest(Scheduler(4096), [session(0, 4097)]) == [[2112], [1985]]
    assert ingest(Scheduler(4096, even_chunks=False), [session(0, 4097)]) == [[4096], [1]]


def test_a_backlog_within_the_budget_is_one_chunk() -> None:
    assert ingest(Scheduler(2048), [session(0, 2048, computed=0)]) == [[2048]]
    assert even_chunk(17, 2048) == 17


def test_sessions_share_a_step_up_to_the_budget() -> None:
    a, b = session(0, 300), session(1, 5000)
    steps = ingest(Scheduler(2048), [a, b])
    assert all(sum(step) <= 2048 for step in steps)
    assert sum(map(sum, steps)) == 5300


def test_a_question_runs_before_any_session_data() -> None:
    data = session(0, 1000)
    query = QueryState(tokens=list(range(40)), base=0, query_id=1, phase=Phase.PREFILL)
    chunks = Scheduler(2048).plan([data], [query], set())
    assert [(ch.seq, ch.length, ch.sample) for ch in chunks] == [(query, 40, True)]
