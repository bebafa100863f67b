"""Flash queries of one session: registered questions re-answered whenever its data advances.

A *round* submits every flash query of the session as a greedy query at once; the worker forks
them over the same prefix in one turn and the scheduler prefills their questions together. At
most one round runs per session; data that arrives meanwhile asks for one more round when it
ends (coalescing: data outpacing the device never queues rounds). Each answer is kept (served
to a matching ``generate`` as ``cached``) and published as a ``flash_answer`` event only when
its text changed. A failed round is logged; the next data starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import torch

from livelm.daemon.engine.events import DATA_UPDATED, FLASH_ANSWER, SESSION_CLOSED, EventHub
from livelm.daemon.engine.query import QueryHandle
from livelm.protocol.errors import InternalError, InvalidRequest, LiveLMError, Overloaded
from livelm.protocol.messages import (
    DataUpdated,
    DoneReply,
    FlashAnswer,
    FlashRegistered,
    FlashSpec,
    GenerateRequest,
    TokenEvent,
)

log = logging.getLogger("livelm.flash")
ROUND_RETRY_S = 1.0  # a round that found no KV room is asked again after this long

StartQuery = Callable[[GenerateRequest], QueryHandle]


def confidence(first_logits: torch.Tensor) -> float:
    """p(top1) - p(top2) of the first answer token's softmax: 1 = certain, 0 = a coin toss."""
    probs = torch.softmax(first_logits.float().flatten(), dim=0)
    top = torch.topk(probs, k=min(2, probs.numel())).values.tolist()
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


def cache_compatible(done: DoneReply, flash_max_tokens: int, req: GenerateRequest) -> bool:
    """Would a greedy run of ``req`` give exactly ``done``? (It must be greedy, without stop
    strings or choices.) An answer that ended at end-of-sequence after n tokens is the answer
    of any ``max_tokens`` > n; one cut at its length only of the same ``max_tokens``."""
    if req.temperature != 0.0 or req.stop or req.choices is not None:
        return False
    if done.finish_reason == "stop":
        return req.max_tokens > len(done.tokens)
    return done.finish_reason == "length" and req.max_tokens == flash_max_tokens


@dataclass
class FlashQuery:
    query_id: int
    query: str
    max_tokens: int
    answer: FlashAnswer | None = None
    done: DoneReply | None = None
    tokens: list[TokenEvent] = field(default_factory=list)  # the answer's token events


class FlashBoard:
    """The flash queries, their rounds and the event hub of one session (loop thread only)."""

    def __init__(
        self,
        session_id: str,
        hub: EventHub,
        start_query: StartQuery,
        limit: int,
        counters: dict[str, int],
    ) -> None:
        self.session_id = session_id
        self.hub = hub
        self._start_query = start_query
        self._limit = limit
        self._counters = counters  # the engine's, for /metrics
        self._queries: dict[int, FlashQuery] = {}
        self._next_id = 1
        self._round: asyncio.Task[None] | None = None
        self._wanted = False  # data advanced since the running round started
        self._seen_seq = 0  # newest ingested_seq published as data_updated
        self.closed = False

    # ---- registration and answers ----------------------------------------------------------
    def register(self, spec: FlashSpec) -> FlashRegistered:
        if not spec.query.strip():
            raise InvalidRequest("query is empty")
        for q in self._queries.values():
            if q.query == spec.query and q.max_tokens == spec.max_tokens:
                return self._registered(q)  # registering again is harmless (reconnects)
        if len(self._queries) >= self._limit:
            raise InvalidRequest(f"a session holds at most {self._limit} flash queries")
        q = FlashQuery(self._next_id, spec.query, spec.max_tokens)
        self._next_id += 1
        self._queries[q.query_id] = q
        self.request_round()
        return self._registered(q)

    def answers(self) -> list[FlashAnswer]:
        return [q.answer for q in self._queries.values() if q.answer is not None]

    def cached(
        self, req: GenerateRequest, last_seq: int
    ) -> tuple[DoneReply, list[TokenEvent]] | None:
        """The kept answer that ``req`` would compute now, or None (then it runs as usual):
        only one that saw every acknowledged push (``last_seq``), as a fresh answer would."""
        for q in self._queries.values():
            if q.query != req.prompt or q.done is None or q.done.data_seq != last_seq:
                continue
            if cache_compatible(q.done, q.max_tokens, req):
                return msgspec.structs.replace(q.done, cached=True), list(q.tokens)
        return None

    @property
    def round_running(self) -> bool:
        return self._round is not None

    # ---- progress ----------------------------------------------------------------------------
    def progress(self, ingested_seq: int, context_tokens: int) -> None:
        """Worker progress: publish ``data_updated`` and ask for a round when data advanced."""
        if self.closed or ingested_seq <= self._seen_seq:
            return  # includes a window rebuild catching up to what was published before
        self._seen_seq = ingested_seq
        body = DataUpdated(session_id=self.session_id, data_seq=ingested_seq, tokens=context_tokens)
        self.hub.publish(DATA_UPDATED, body)
        self.request_round()

    def request_round(self) -> None:
        if self.closed or not self._queries:
            return
        self._wanted = True
        if self._round is not None:
            self._counters["flash_rounds_coalesced_total"] += 1
            return
        self._round = asyncio.get_running_loop().create_task(self._run_rounds())

    def close(self, reason: str = SESSION_CLOSED) -> None:
        """Stops rounds (cancelling their queries) and ends every subscription."""
        self.closed = True
        if self._round is not None:
            self._round.cancel()
        self.hub.close(reason)

    # ---- rounds ------------------------------------------------------------------------------
    async def _run_rounds(self) -> None:
        try:
            while self._wanted and not self.closed:
                self._wanted = False
                delay = await self._run_round(list(self._queries.values()))
                if delay is not None:  # no KV room now: the answers would go stale till the
                    self._wanted = True  # next data, so the round is asked again
                    self._counters["flash_rounds_retried_total"] += 1
                    await asyncio.sleep(delay)
        finally:
            self._round = None

    async def _run_round(self, queries: list[FlashQuery]) -> float | None:
        """Answers every flash query once; the seconds to wait before trying again when the
        KV cache had no room for the round, else None."""
        self._counters["flash_rounds_total"] += 1
        handles: list[QueryHandle] = []
        try:
            # all submitted in one go: the worker forks them together over the same prefix
            for q in queries:
                req = GenerateRequest(prompt=q.query, max_tokens=q.max_tokens)
                handles.append(self._start_query(req))
            results = await asyncio.gather(*map(_collect, handles), return_exceptions=True)
        except Overloaded as exc:
            log.info(
                "flash round waits for room: %s", exc, extra={"session_id": self.session_id}
            )
            return exc.retry_after or ROUND_RETRY_S
        except LiveLMError as exc:
            log.warning(
                "flash round could not start: %s", exc, extra={"session_id": self.session_id}
            )
            return None
        finally:
            for handle in handles:
                handle.cancel()  # no-op for finished ones; stops the rest when cancelled
        for q, result in zip(queries, results, strict=True):
            if isinstance(result, BaseException):
                self._log_failure(q, result)
            elif not self.closed:
                self._record(q, *result)
        return None

    def _record(
        self, q: FlashQuery, tokens: list[TokenEvent], done: DoneReply, conf: float
    ) -> None:
        changed = q.answer is None or q.answer.text != done.text
        q.done, q.tokens = done, tokens
        q.answer = FlashAnswer(
            session_id=self.session_id,
            query_id=q.query_id,
            query=q.query,
            text=done.text,
            confidence=conf,
            data_seq=done.data_seq,
        )
        if changed:
            self.hub.publish(FLASH_ANSWER, q.answer)
            self._counters["flash_answers_published_total"] += 1

    def _log_failure(self, q: FlashQuery, exc: BaseException) -> None:
        extra = {"session_id": self.session_id, "query_id": q.query_id}
        if isinstance(exc, LiveLMError):
            log.warning("flash query failed: %s", exc, extra=extra)
        else:
            log.error("flash query failed", exc_info=exc, extra=extra)

    @staticmethod
    def _registered(q: FlashQuery) -> FlashRegistered:
        return FlashRegistered(query_id=q.query_id, query=q.query, max_tokens=q.max_tokens)


async def _collect(handle: QueryHandle) -> tuple[list[TokenEvent], DoneReply, float]:
    tokens = [event async for event in handle]
    done = await handle.result()
    if handle.first_logits is None:
        raise InternalError("the worker returned no logits for a flash query")
    return tokens, done, confidence(handle.first_logits)
