"""A session's accepted entries under its window: pushes past the window drop the oldest
entries down to the low-water mark, the new ones too when a push alone overflows it."""

from __future__ import annotations

import random

from livelm.daemon.engine.sessions import Session


def _session(window: int, opening: int, low_water: float) -> Session:
    return Session(session_id="s", slot=1, template="raw", format="text", window=window,
                   opening_tokens=opening, question_suffix=[], low_water=low_water)


def _kept_by_definition(entries: list[tuple[int, int]], opening: int, window: int,
                        low_water: float) -> list[tuple[int, int]]:
    """Every entry, oldest first; if they overflow the window, drop the oldest while more
    than one is left and the total is above the low-water mark."""
    kept = list(entries)
    if opening + sum(n for _, n in kept) > window:
        while len(kept) > 1 and opening + sum(n for _, n in kept) > int(window * low_water):
            kept.pop(0)
    return kept


def test_pushes_keep_what_the_window_allows_and_count_the_rest_dropped() -> None:
    rng = random.Random(5)
    for _ in range(200):
        window, opening, low_water = rng.randint(20, 120), rng.randint(0, 10), rng.choice([0.5, 0.8, 1.0])
        session = _session(window, opening, low_water)
        every: list[tuple[int, int]] = []
        for _ in range(rng.randint(1, 8)):
            sizes = [rng.randint(1, 30) for _ in range(rng.randint(1, 6))]
            plan = session.plan_push(sizes)
            every += [(plan.first_seq + i, n) for i, n in enumerate(sizes)]
            expected = _kept_by_definition(list(session.entries) + every[-len(sizes):], opening,
                                           window, low_water)
            overflowed = opening + session.data_tokens + sum(sizes) > window
            session.commit(plan)
            assert list(session.entries) == expected
            assert plan.first_kept_seq == (expected[0][0] if overflowed else None)
            assert session.data_tokens == sum(n for _, n in expected)
            assert session.dropped == len(every) - len(session.entries)
            assert session.last_seq == every[-1][0]
