"""The scheduler's step plans: questions first, session backlogs in budget-sized chunks."""

from __future__ import annotations

import pytest

from livelm.daemon.engine.scheduler import Scheduler
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


@pytest.mark.parametrize("pending,budget", [(5205, 4096), (4097, 4096), (2048, 2048), (600, 512)])
def test_a_backlog_takes_full_budgets_then_the_rest(pending: int, budget: int) -> None:
    """Full steps then the remainder: a short remainder replays a captured data graph, which
    costs little, where an even split would leave two padded or eager steps."""
    steps = ingest(Scheduler(budget), [session(0, pending)])
    assert [step[0] for step in steps] == [budget] * (pending // budget) + (
        [pending % budget] if pending % budget else [])


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


def test_a_session_a_query_waits_on_is_ingested_first() -> None:
    idle, awaited = session(0, 3000), session(1, 3000)
    chunks = Scheduler(2048).plan([idle, awaited], [], {awaited.slot})
    assert [(ch.seq.slot, ch.length) for ch in chunks] == [(1, 2048)]
