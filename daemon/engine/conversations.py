"""Completions: answers that continue a raw token prompt, reusing the KV of recent ones.

Each completion's prompt but its last token is kept as a *conversation*, an internal session
in the paged pool (hidden from the session API and its limits). A new prompt finds the
conversation sharing its longest prefix and asks only the rest:

* the conversation is a prefix of the prompt: the new tokens are pushed into it as data;
* the prompt diverges inside it: a BRANCH record starts a new conversation sharing its KV up
  to the divergence (full blocks by reference, the partial block copied);
* nothing matches (or reuse is off): a new conversation is opened.

The query then prefills the prompt's last token over the conversation, forked at exactly the
conversation's length at that moment. Setting up a completion is serialized by one lock, so
two requests on one conversation extend it in turn or branch from it. Idle conversations are
evicted least recently used when the block budget is short or there are more than
``prefix_cache_conversations``; a conversation with a query running over it is never evicted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from livelm.daemon.engine import records
from livelm.daemon.engine.admission import BlockBudget
from livelm.daemon.engine.prefix_branch import branch_payload
from livelm.daemon.engine.prefix_match import Conversation, longest_prefix
from livelm.daemon.engine.query import QueryHandle
from livelm.daemon.engine.sequence import QueryState
from livelm.protocol.errors import InternalError, InvalidRequest, Overloaded, TooLarge

if TYPE_CHECKING:
    from livelm.daemon.engine.choices import Choices
    from livelm.daemon.engine.sampling import SamplingParams
    from livelm.daemon.engine.sessions import Session


@dataclass(frozen=True)
class Completion:
    handle: QueryHandle
    prompt_tokens: int  # tokens the answer continues after (a session's context included)
    cached_tokens: int  # of those, tokens whose KV was already there (not computed again)


@dataclass(frozen=True)
class CompletionLimits:
    conversations: int  # conversations kept for reuse; 0 = reuse off
    max_context: int
    max_entry_tokens: int  # longest question over a session
    vocab_size: int


@dataclass(frozen=True)
class EngineHooks:
    """What conversations need of the engine."""

    write_records: Callable[[list[np.ndarray]], Awaitable[None]]
    start_query: Callable[[QueryState, int], QueryHandle]  # (query, context tokens)
    take_slot: Callable[[], int]
    accepting: Callable[[], bool]


@dataclass(frozen=True)
class _Plan:
    """How a prompt gets its conversation: reuse ``matched`` tokens of ``source`` (extend it
    whole, or branch from it), or open a new one when ``source`` is None."""

    source: Conversation | None
    matched: int

    @property
    def extends(self) -> bool:
        return self.source is not None and self.matched == len(self.source)


class Conversations:
    def __init__(self, budget: BlockBudget, limits: CompletionLimits, hooks: EngineHooks) -> None:
        self.budget, self.limits, self.hooks = budget, limits, hooks
        self.table: dict[int, Conversation] = {}  # by slot
        self._lock = asyncio.Lock()
        self._clock = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {
            "prefix_cache_hits_total": 0,
            "prefix_cache_misses_total": 0,
            "prefix_cache_reused_tokens_total": 0,
            "prefix_cache_evictions_total": 0,
        }

    # ---- over a session ------------------------------------------------------------------
    def over_session(
        self, session: Session, prompt: list[int], params: SamplingParams, choices: Choices | None
    ) -> Completion:
        """``prompt`` is the whole question (no question suffix is added)."""
        self._check_ids(prompt)
        if session.error is not None:
            raise InternalError(
                f"session {session.session_id!r} cannot answer: {session.error}; "
                "close it and open a new one"
            )
        if len(prompt) > self.limits.max_entry_tokens:
            raise TooLarge(
                f"the prompt takes {len(prompt)} tokens; at most {self.limits.max_entry_tokens}"
            )
        context = session.context_tokens
        self._check_length(context + len(prompt), params.max_tokens)
        state = QueryState(
            tokens=[],
            slot=session.slot,
            target_seq=session.last_seq,
            question=list(prompt),
            params=params,
            choices=choices,
        )
        handle = self.hooks.start_query(state, context)
        return Completion(handle, context + len(prompt), context)

    # ---- with reuse ------------------------------------------------------------------------
    async def complete(
        self, prompt: list[int], params: SamplingParams, choices: Choices | None
    ) -> Completion:
        tokens = self._check_ids(prompt)
        self._check_length(len(tokens), params.max_tokens)
        keep = len(tokens) - 1  # the conversation holds all but the last token
        async with self._lock:
            await self._trim_to_limit()
            plan = self._plan(tokens, keep)
            if plan.source is not None:
                plan.source.users += 1  # making room must not evict what this request reuses
            try:
                await self._make_room_for(plan, keep, params.max_tokens)
                conv = await self._conversation(plan, tokens, keep)
            finally:
                if plan.source is not None:
                    plan.source.users -= 1
            handle = self._ask(conv, tokens, params, choices)
        self._count(plan.matched)
        return Completion(handle, len(tokens), plan.matched)

    async def _make_room_for(self, plan: _Plan, keep: int, max_tokens: int) -> None:
        held = plan.source.reserved_blocks if plan.extends and plan.source else 0
        grow = self.budget.session_blocks(keep) - held
        await self._make_room(grow + self.budget.query_blocks(keep, 1 + max_tokens))
        if grow > self.budget.available:
            raise Overloaded(
                f"the KV cache is busy: this prompt needs {grow} more blocks, "
                f"{self.budget.available} free",
                retry_after=1.0,
            )

    def _plan(self, tokens: np.ndarray, keep: int) -> _Plan:
        if self.limits.conversations == 0:
            return _Plan(None, 0)
        source, matched = longest_prefix(list(self.table.values()), tokens, keep)
        return _Plan(source, matched)

    async def _conversation(self, plan: _Plan, tokens: np.ndarray, keep: int) -> Conversation:
        new = tokens[plan.matched : keep].tolist()
        source = plan.source
        if source is not None and plan.extends:
            if new:
                seq = source.last_seq + 1
                record = records.encode(records.Kind.DATA, source.slot, seq, new)
                await self._write_grown(source, record, tokens[:keep])
                source.last_seq = seq
            return source
        conv = Conversation(slot=self.hooks.take_slot(), tokens=np.empty(0, dtype=np.int64))
        if source is None:
            record = records.encode(records.Kind.OPEN, conv.slot, 0, new)
        else:
            payload = branch_payload(plan.matched, new)
            record = records.encode(records.Kind.BRANCH, conv.slot, source.slot, payload)
        await self._write_grown(conv, record, tokens[:keep])
        self.table[conv.slot] = conv
        return conv

    async def _write_grown(
        self, conv: Conversation, record: np.ndarray, tokens: np.ndarray
    ) -> None:
        """Reserves the blocks ``conv`` needs to hold ``tokens``, writes its record, and
        commits the new state only once the record is out (a refused record changes nothing)."""
        needed = self.budget.session_blocks(len(tokens))
        self.budget.grow_session(conv.reserved_blocks, needed)
        try:
            await self.hooks.write_records([record])
        except BaseException:
            self.budget.release(needed - conv.reserved_blocks)
            raise
        conv.reserved_blocks = needed
        conv.tokens = tokens.copy()

    def _ask(
        self,
        conv: Conversation,
        tokens: np.ndarray,
        params: SamplingParams,
        choices: Choices | None,
    ) -> QueryHandle:
        context = len(conv)
        state = QueryState(
            tokens=[],
            slot=conv.slot,
            target_seq=conv.last_seq,
            question=tokens[context:].tolist(),
            params=params,
            choices=choices,
            fork_at=context,
        )
        handle = self.hooks.start_query(state, context)
        self._clock += 1
        conv.last_used = self._clock
        conv.users += 1
        handle.on_done(lambda error: self._query_ended(conv, error))
        return handle

    def _query_ended(self, conv: Conversation, error: BaseException | None) -> None:
        conv.users -= 1
        conv.broken = conv.broken or error is not None
        if conv.users == 0 and (conv.broken or len(self.table) > self.limits.conversations):
            self._spawn(self._evict_idle())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- eviction ----------------------------------------------------------------------------
    async def _evict_idle(self) -> None:
        async with self._lock:
            for conv in [c for c in self.table.values() if c.broken and c.users == 0]:
                await self._evict(conv)
            await self._trim_to_limit()

    async def _trim_to_limit(self) -> None:
        while len(self.table) > self.limits.conversations:
            if not await self._evict_lru():
                return

    async def make_room(self, blocks: int) -> None:
        """For sessions and session queries: conversations give way to them."""
        if self.budget.available < blocks:
            async with self._lock:
                await self._make_room(blocks)

    def make_room_soon(self, blocks: int) -> None:
        """From code that cannot wait: frees blocks in the background (the caller is told
        to retry meanwhile)."""
        if self.table:
            self._spawn(self.make_room(blocks))

    async def _make_room(self, blocks: int) -> None:
        """Evicts idle conversations, least recently used first, until ``blocks`` are free
        or none is left (the caller's reservation then fails as it would have)."""
        while self.budget.available < blocks:
            if not await self._evict_lru():
                return

    async def _evict_lru(self) -> bool:
        idle = [c for c in self.table.values() if c.users == 0]
        if not idle:
            return False
        await self._evict(min(idle, key=lambda c: c.last_used))
        return True

    async def _evict(self, conv: Conversation) -> None:
        del self.table[conv.slot]
        if not self.hooks.accepting():  # shutting down: the worker and its pool are going
            return
        # shielded: once out of the table it is closed and its blocks released, whatever
        # happens to the request that evicted it
        await asyncio.shield(self._close(conv))

    async def _close(self, conv: Conversation) -> None:
        await self.hooks.write_records([records.encode(records.Kind.CLOSE, conv.slot)])
        self.budget.release(conv.reserved_blocks)
        self.counters["prefix_cache_evictions_total"] += 1

    # ---- checks and numbers ----------------------------------------------------------------
    def _check_ids(self, prompt: list[int]) -> np.ndarray:
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        tokens = np.asarray(prompt, dtype=np.int64)
        if tokens.ndim != 1 or tokens.min() < 0 or tokens.max() >= self.limits.vocab_size:
            raise InvalidRequest(
                f"prompt token ids must be integers from 0 to {self.limits.vocab_size - 1}"
            )
        return tokens

    def _check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.limits.max_context:
            raise InvalidRequest(
                f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.limits.max_context} tokens"
            )

    def _count(self, matched: int) -> None:
        if matched:
            self.counters["prefix_cache_hits_total"] += 1
            self.counters["prefix_cache_reused_tokens_total"] += matched
        else:
            self.counters["prefix_cache_misses_total"] += 1

    def metrics(self) -> dict[str, float]:
        return {
            "prefix_cache_conversations": float(len(self.table)),
            "prefix_cache_blocks_reserved": float(
                sum(c.reserved_blocks for c in self.table.values())
            ),
            **{k: float(v) for k, v in self.counters.items()},
        }
