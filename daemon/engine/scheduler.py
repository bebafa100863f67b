"""Chooses what one worker step computes.

Priorities: questions first (latency): when any query has question tokens to prefill, the step
holds only those, so a short question runs alone and can replay its captured graph. The forks
that score a classification's multi-token choices count as questions. Otherwise
live answers decode together; session data is ingested in the remaining steps, alternating
with decode steps (at a quarter of the budget) while answers are being generated. Sessions
that queries are waiting on are ingested first.
"""

from __future__ import annotations

from dataclasses import dataclass

from livelm.daemon.engine.sequence import Phase, QueryState, Sequence, SessionState


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # absolute position of the first new token
    length: int
    sample: bool  # a token is drawn from the chunk's last row
    score: bool = False  # every row's log-probability of its target token is returned


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_decode_seqs: int = 256) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_decode_seqs = max_decode_seqs
        self._rotation = 0
        self._data_turn = False

    def plan(
        self, sessions: list[SessionState], queries: list[QueryState], awaited: set[int]
    ) -> list[Chunk]:
        """``awaited``: slots of sessions that waiting queries need ingested first."""
        questions = self._questions(queries)
        if questions:
            return questions
        decode = [Chunk(q, q.num_computed, 1, True) for q in queries if q.phase is Phase.DECODE]
        decode = decode[: self.max_decode_seqs]
        data_budget = self.max_batch_tokens if not decode else self.max_batch_tokens // 4
        self._data_turn = not self._data_turn
        if decode and not self._data_turn:
            return decode
        data = self._data(sessions, awaited, data_budget)
        return data or decode

    def _questions(self, queries: list[QueryState]) -> list[Chunk]:
        chunks, budget = [], self.max_batch_tokens
        for q in queries:
            if q.phase is Phase.PREFILL and budget > 0:
                n = min(q.pending, budget)
                chunks.append(Chunk(q, q.num_computed, n, n == q.pending))
                budget -= n
            elif q.phase is Phase.SCORE:
                for fork in q.scoring:
                    if fork.pending > 0 and budget > 0:
                        n = min(fork.pending, budget)
                        chunks.append(Chunk(fork, fork.num_computed, n, False, score=True))
                        budget -= n
        return chunks

    def _data(self, sessions: list[SessionState], awaited: set[int], budget: int) -> list[Chunk]:
        chunks = []
        for s in self._data_order(sessions, awaited):
            if budget <= 0:
                break
            n = min(s.pending, budget)
            chunks.append(Chunk(s, s.num_computed, n, False))
            budget -= n
        return chunks

    def _data_order(self, sessions: list[SessionState], awaited: set[int]) -> list[SessionState]:
        pending = [s for s in sessions if s.pending > 0]
        if not pending:
            return []
        self._rotation = (self._rotation + 1) % len(pending)
        rotated = pending[self._rotation :] + pending[: self._rotation]
        return sorted(rotated, key=lambda s: s.slot not in awaited)  # stable: awaited first
