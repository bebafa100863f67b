"""The engine as the event loop sees it: sessions, pushes, queries; the worker does the math.

Nothing here blocks or touches the device. Entries travel to the worker through the native
ring in seq order; queries and cancels through the worker's command queue; results come
back in one loop callback per worker step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from livelm.daemon.engine import records
from livelm.daemon.engine.admission import BlockBudget
from livelm.daemon.engine.block_pool import BlockPool
from livelm.daemon.engine.formats import render_entry
from livelm.daemon.engine.graphs import StepGraphs
from livelm.daemon.engine.kv_cache import KVCache, auto_kv_tokens
from livelm.daemon.engine.kv_manager import KVManager
from livelm.daemon.engine.layout import build_layout
from livelm.daemon.engine.query import QueryHandle
from livelm.daemon.engine.runner import ModelRunner
from livelm.daemon.engine.sampling import SamplingParams
from livelm.daemon.engine.scheduler import Scheduler
from livelm.daemon.engine.sequence import QueryState
from livelm.daemon.engine.sessions import Session, SlotAllocator, new_session_id
from livelm.daemon.engine.worker import CancelQuery, StartQuery, StepReport, Worker
from livelm.native.ring import Ring
from livelm.protocol.errors import (
    InvalidRequest,
    Overloaded,
    TooLarge,
    UnknownSession,
)
from livelm.protocol.messages import (
    GenerateRequest,
    InitRequest,
    PushReply,
    SessionReply,
    StatusReply,
)

if TYPE_CHECKING:
    from livelm.daemon.config import Config
    from livelm.daemon.model.loader import LoadedModel

log = logging.getLogger("livelm.engine")
TOKENIZE_OFF_LOOP_ENTRIES = 64  # larger pushes are tokenized on a thread
RING_RETRY_S = 0.05


class Engine:
    def __init__(self, model: LoadedModel, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.model, self.config, self.loop = model, config, loop
        self.tokenizer = model.tokenizer
        decoder = model.decoder
        block_size = config.block_size
        kv_tokens = config.kv_cache_tokens or auto_kv_tokens(
            model.config, decoder.dtype, decoder.device, config.kv_memory_fraction
        )
        num_blocks = max(kv_tokens // block_size, 3)
        self.max_context = min(
            config.max_context_tokens or decoder.max_positions,
            decoder.max_positions,
            (num_blocks - 3) * block_size,
        )
        self.default_window = config.default_window or self.max_context - min(
            self.max_context // 8, 4096
        )
        cache = KVCache(model.config, num_blocks, block_size, decoder.dtype, decoder.device)
        self.budget = BlockBudget(num_blocks - 1, block_size)  # less the scratch block
        self.ring = Ring(config.ring_words)
        graphs = None
        if config.cuda_graphs and decoder.device.type == "cuda":
            graphs = StepGraphs(
                decoder, cache, self.max_context, config.graph_max_batch, config.graph_max_question
            )
            graphs.capture()
        self.worker = Worker(
            ModelRunner(decoder, cache, graphs),
            KVManager(BlockPool(num_blocks), cache),
            Scheduler(config.max_batch_tokens),
            self.ring,
            self.tokenizer,
            self.max_context,
            self._report_threadsafe,
            reprefill=config.reprefill_queries,
        )
        self.sessions: dict[str, Session] = {}
        self._by_slot: dict[int, Session] = {}
        self._slots = SlotAllocator()
        self._query_ids = itertools.count(1)
        self._inflight: dict[int, tuple[QueryHandle, int]] = {}
        self._ring_lock = asyncio.Lock()
        self._ring_space = asyncio.Event()
        self._accepting = True
        self.ready = False
        self.counters = {
            "entries_accepted_total": 0,
            "queries_started_total": 0,
            "tokens_generated_total": 0,
            "ring_full_waits_total": 0,  # times a producer was held back by a full ring
        }

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()
        self.ready = True
        log.info(
            "engine started",
            extra={
                "kv_blocks": self.budget.total,
                "block_size": self.budget.block_size,
                "max_context": self.max_context,
            },
        )

    async def stop(self, drain_timeout: float) -> None:
        self._accepting = False
        self.ready = False
        deadline = self.loop.time() + drain_timeout
        while self._inflight and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for handle, _ in list(self._inflight.values()):
            handle.cancel()
        self.worker.stop()
        await self.loop.run_in_executor(None, self.worker.join, 10.0)
        if not self.worker.is_alive():
            self.ring.close()

    # ---- sessions ----------------------------------------------------------------------------
    async def init_session(self, req: InitRequest) -> SessionReply:
        self._check_accepting()
        if len(self.sessions) >= self.config.max_sessions:
            raise Overloaded(f"the daemon holds its limit of {self.config.max_sessions} sessions")
        if req.flash:
            raise InvalidRequest("flash queries are not available in this build yet")
        session_id = new_session_id(req.session_id, self.sessions)
        window = self._window(req.window)
        if req.template == "chat" and self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template; use template 'raw'")
        layout = await self._off_loop(
            build_layout, self.tokenizer, req.template, req.prompt, big=len(req.prompt) // 256
        )
        if len(layout.opening) >= window:
            raise TooLarge(f"the prompt takes {len(layout.opening)} tokens; the window is {window}")
        blocks = self.budget.session_blocks(len(layout.opening))
        self.budget.grow_session(0, blocks)
        session = Session(
            session_id=session_id,
            slot=self._slots.take(),
            template=req.template,
            format=req.format,
            window=window,
            opening_tokens=len(layout.opening),
            question_suffix=layout.question_suffix,
            low_water=self.config.window_low_water,
            reserved_blocks=blocks,
        )
        await self._write_records(
            [records.encode(records.Kind.OPEN, session.slot, 0, layout.opening)]
        )
        self.sessions[session_id] = session
        self._by_slot[session.slot] = session
        return SessionReply(
            session_id=session_id,
            prompt_tokens=session.opening_tokens,
            template=req.template,
            format=req.format,
            window=window,
        )

    def _window(self, requested: int | None) -> int:
        if requested is None:
            return self.default_window
        if not 1 <= requested <= self.max_context:
            raise InvalidRequest(f"window must be between 1 and {self.max_context} tokens")
        return requested

    def status(self, session_id: str) -> StatusReply:
        return self._session(session_id).status()

    async def close_session(self, session_id: str) -> None:
        session = self._session(session_id)
        async with session.lock:
            if self.sessions.get(session_id) is not session:
                raise UnknownSession(f"unknown session {session_id!r}")
            del self.sessions[session_id]
            await self._write_records([records.encode(records.Kind.CLOSE, session.slot)])
            self.budget.release(session.reserved_blocks)

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"unknown session {session_id!r}")
        return session

    # ---- data ----------------------------------------------------------------------------
    async def push(self, session_id: str, data: list[Any]) -> PushReply:
        self._check_accepting()
        session = self._session(session_id)
        if not data:
            raise InvalidRequest("data is empty: push at least one entry")
        if len(data) > self.config.max_push_entries:
            raise TooLarge(f"a push holds at most {self.config.max_push_entries} entries")
        lines = [render_entry(entry, session.format, i) for i, entry in enumerate(data)]
        tokens = await self._off_loop(self.tokenizer.encode_batch, lines, big=len(lines))
        self._check_entry_sizes(session, tokens)
        # from here the push completes or fails as a whole, even if its client goes away
        return await asyncio.shield(self._accept(session, tokens))

    async def _accept(self, session: Session, tokens: list[list[int]]) -> PushReply:
        async with session.lock:
            if self.sessions.get(session.session_id) is not session:
                raise UnknownSession(f"session {session.session_id!r} was closed")
            plan = session.plan_push([len(t) for t in tokens])
            needed = self.budget.session_blocks(session.opening_tokens + plan.data_tokens)
            if needed > session.reserved_blocks:
                self.budget.grow_session(session.reserved_blocks, needed)
                session.reserved_blocks = needed
            words = []
            if plan.first_kept_seq is not None:
                words.append(records.encode(records.Kind.TRIM, session.slot, plan.first_kept_seq))
            words += [
                records.encode(records.Kind.DATA, session.slot, plan.first_seq + i, t)
                for i, t in enumerate(tokens)
            ]
            await self._write_records(words)
            session.commit(plan)
        self.counters["entries_accepted_total"] += len(tokens)
        return PushReply(session_id=session.session_id, seq=session.last_seq, accepted=len(tokens))

    def _check_entry_sizes(self, session: Session, tokens: list[list[int]]) -> None:
        room = min(session.window - session.opening_tokens, self.config.max_entry_tokens)
        for i, t in enumerate(tokens):
            if len(t) > room:
                raise TooLarge(
                    f"data[{i}] takes {len(t)} tokens; an entry may take at most {room} "
                    f"(window {session.window}, prompt {session.opening_tokens})"
                )

    async def _write_records(self, batch: list[np.ndarray]) -> None:
        async with self._ring_lock:
            for words in batch:
                if len(words) > self.ring.capacity:
                    raise TooLarge(f"a record of {len(words)} words exceeds the ring")
                while not self.ring.write(words):  # full: hold the producer back, never drop
                    self.counters["ring_full_waits_total"] += 1
                    self._ring_space.clear()
                    try:
                        await asyncio.wait_for(self._ring_space.wait(), RING_RETRY_S)
                    except asyncio.TimeoutError:  # a distinct class before 3.11
                        pass

    # ---- queries ---------------------------------------------------------------------------
    def generate(
        self, session_id: str, req: GenerateRequest, *, capture_logits: bool = False
    ) -> QueryHandle:
        self._check_accepting()
        session = self._session(session_id)
        params = self._sampling(req)
        question = self.tokenizer.encode(req.prompt) + session.question_suffix
        if not question:
            raise InvalidRequest("prompt is empty")
        if len(question) > self.config.max_entry_tokens:
            raise TooLarge(
                f"the prompt takes {len(question)} tokens; at most {self.config.max_entry_tokens}"
            )
        context = session.context_tokens
        if context + len(question) + params.max_tokens > self.max_context:
            raise InvalidRequest(
                f"context ({context}) + prompt ({len(question)}) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_context} tokens"
            )
        if self.config.reprefill_queries:
            blocks = self.budget.session_blocks(context + len(question) + params.max_tokens)
        else:
            blocks = self.budget.query_blocks(context, len(question) + params.max_tokens)
        self.budget.reserve_query(blocks)
        query_id = next(self._query_ids)
        handle = QueryHandle(query_id, self._cancel)
        self._inflight[query_id] = (handle, blocks)
        state = QueryState(
            tokens=[],
            query_id=query_id,
            slot=session.slot,
            target_seq=session.last_seq,
            question=question,
            params=params,
            capture_logits=capture_logits,
        )
        self.worker.submit(StartQuery(state))
        self.counters["queries_started_total"] += 1
        return handle

    def _sampling(self, req: GenerateRequest) -> SamplingParams:
        limit = self.config.max_new_tokens
        if not 1 <= req.max_tokens <= limit:
            raise InvalidRequest(f"max_tokens must be between 1 and {limit}")
        if not (math.isfinite(req.temperature) and 0.0 <= req.temperature <= 100.0):
            raise InvalidRequest("temperature must be between 0 and 100")
        if not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
            raise InvalidRequest("top_p must be in (0, 1]")
        if req.top_k < 0:
            raise InvalidRequest("top_k must be 0 (off) or positive")
        if req.choices is not None:
            raise InvalidRequest("choices are not available in this build yet")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > self.config.max_stop_sequences or any(not s or len(s) > 256 for s in stop):
            raise InvalidRequest(
                f"stop takes at most {self.config.max_stop_sequences} non-empty strings of up to 256 characters"
            )
        return SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=stop,
            eos_ids=self.model.eos_ids,
        )

    def _cancel(self, query_id: int) -> None:
        if query_id in self._inflight:
            self.worker.submit(CancelQuery(query_id))

    # ---- results from the worker -------------------------------------------------------------
    def _report_threadsafe(self, report: StepReport) -> None:
        self.loop.call_soon_threadsafe(self._apply_report, report)

    def _apply_report(self, report: StepReport) -> None:
        for p in report.progress:
            session = self._by_slot.get(p.slot)
            if session is not None:
                session.ingested_seq = p.ingested_seq
                session.computed_tokens = p.context_tokens
                session.pending_tokens = p.pending_tokens
        for query_id, update in report.queries.items():
            entry = self._inflight.get(query_id)
            if entry is None:
                continue
            handle, blocks = entry
            if update.first_logits is not None:
                handle.first_logits = update.first_logits
            if update.done is not None:
                self.counters["tokens_generated_total"] += update.done.usage.completion_tokens
            handle.deliver(update.tokens, update.done, update.error)
            if update.done is not None or update.error is not None:
                del self._inflight[query_id]
                self.budget.release(blocks)
        if report.ring_drained:
            self._ring_space.set()

    # ---- helpers ----------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if not self._accepting:
            raise Overloaded("the daemon is shutting down", retry_after=5.0)
        if self.worker.fatal is not None:
            raise Overloaded("the inference worker stopped; see the daemon log", retry_after=5.0)

    async def _off_loop(self, fn: Any, *args: Any, big: int = 0) -> Any:
        if big > TOKENIZE_OFF_LOOP_ENTRIES:
            return await self.loop.run_in_executor(None, fn, *args)
        return fn(*args)

    def metrics(self) -> dict[str, float]:
        return {
            "sessions": len(self.sessions),
            "queries_inflight": len(self._inflight),
            "kv_blocks": self.budget.total,
            "kv_blocks_reserved": self.budget.reserved,
            "ring_words_used": self.ring.used,
            "worker_alive": float(self.worker.is_alive()),
            **{k: float(v) for k, v in self.counters.items()},
        }
