"""The engine as the event loop sees it: sessions, pushes, queries; the worker does the math.

Nothing here blocks or touches the device. Entries travel to the worker through the native
ring in seq order; queries and cancels through the worker's command queue; results come
back in one loop callback per worker step.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from livelm.daemon.engine import records
from livelm.daemon.engine.admission import BlockBudget
from livelm.daemon.engine.block_pool import BlockPool
from livelm.daemon.engine.choices import Choices, parse_choices, scoring_blocks
from livelm.daemon.engine.conversations import (
    Completion,
    CompletionLimits,
    Conversations,
    EngineHooks,
)
from livelm.daemon.engine.events import SHUTDOWN, EventHub, Subscription, event_names
from livelm.daemon.engine.flash import FlashBoard
from livelm.daemon.engine.formats import render_entry
from livelm.daemon.engine.graphs import StepGraphs
from livelm.daemon.engine.journal import Journal, JournalError, Saved, SessionJournal
from livelm.daemon.engine.kv_cache import KVCache, auto_kv_tokens
from livelm.daemon.engine.kv_manager import KVManager
from livelm.daemon.engine.latency import Latency
from livelm.daemon.engine.layout import build_layout
from livelm.daemon.engine.query import QueryHandle
from livelm.daemon.engine.runner import ModelRunner
from livelm.daemon.engine.sampling import SamplingParams
from livelm.daemon.engine.scheduler import Scheduler
from livelm.daemon.engine.sequence import QueryState
from livelm.daemon.engine.sessions import Session, SlotAllocator, new_session_id
from livelm.daemon.engine.warmup import warm_up
from livelm.daemon.engine.worker import CancelQuery, StartQuery, StepReport, Worker
from livelm.daemon.kernels.ops import Kernels
from livelm.native.ring import Ring
from livelm.protocol.errors import (
    ConfigError,
    InternalError,
    InvalidRequest,
    LiveLMError,
    Overloaded,
    TooLarge,
    UnknownSession,
)
from livelm.protocol.messages import (
    DoneReply,
    FlashAnswer,
    FlashRegistered,
    FlashSpec,
    GenerateRequest,
    InitRequest,
    PushReply,
    SessionReply,
    StatusReply,
    TokenEvent,
)

if TYPE_CHECKING:
    from livelm.daemon.config import Config
    from livelm.daemon.model.loader import LoadedModel

log = logging.getLogger("livelm.engine")
TOKENIZE_OFF_LOOP_ENTRIES = 64  # larger pushes are tokenized on a thread
GREEDY_BELOW_TEMPERATURE = 1e-5
TOKENIZE_OFF_LOOP_CHARS = 16384  # and texts longer than this: about 2 ms of tokenizing
RING_RETRY_S = 0.05


class Engine:
    def __init__(self, model: LoadedModel, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.model, self.config, self.loop = model, config, loop
        self.tokenizer = model.tokenizer
        self.tokenizer.use_piece_cache(config.token_cache_pieces)
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
        cache = KVCache(model.config, num_blocks, block_size, decoder.dtype, decoder.device,
                        decoder.kernels.copy_kv_blocks)
        self.budget = BlockBudget(num_blocks - 1, block_size)  # less the scratch block
        self.ring = Ring(config.ring_words)
        if config.warm_up_kernels and decoder.device.type == "cuda":
            warm_up(decoder, cache, config.max_batch_tokens, self.max_context)
        graphs = None
        if config.cuda_graphs and decoder.device.type == "cuda":
            _check_capturable(decoder.kernels)
            graphs = StepGraphs(
                decoder, cache, self.max_context, config.graph_max_batch,
                config.graph_max_question, min(config.graph_max_data, config.max_batch_tokens),
                config.graph_max_data_seqs,
            )
            graphs.capture()
            _drop_slow_data_graphs(graphs)
        self.worker = Worker(
            ModelRunner(decoder, cache, graphs),
            KVManager(BlockPool(num_blocks), cache),
            Scheduler(config.max_batch_tokens),
            self.ring,
            self.tokenizer,
            self.max_context,
            self._report_threadsafe,
            reprefill=config.reprefill_queries,
            run_ahead=config.decode_run_ahead and decoder.device.type == "cuda",
        )
        self.sessions: dict[str, Session] = {}
        self._by_slot: dict[int, Session] = {}  # live sessions by ring slot
        self._query_sessions: dict[int, Session] = {}  # in-flight queries forked from a session
        self._slots = SlotAllocator()
        self._opening: set[str] = set()  # ids of sessions whose init is under way
        self._query_ids = itertools.count(1)
        self._inflight: dict[int, tuple[QueryHandle, int]] = {}
        self._commands: list[StartQuery | CancelQuery] = []  # for the worker, sent once a loop turn
        self._flash: dict[str, FlashBoard] = {}  # per session: flash queries and events
        self.conversations = Conversations(
            self.budget,
            CompletionLimits(
                config.prefix_cache_conversations,
                self.max_context,
                config.max_entry_tokens,
                model.config.vocab_size,
            ),
            EngineHooks(self._write_records, self.start_query, self._slots.take, lambda: self.ready),
        )
        self._ring_lock = asyncio.Lock()
        self._ring_space = asyncio.Event()
        self._accepting = True
        self.ready = False
        self.latency = Latency()
        self.journal = (
            Journal(Path(config.journal_dir), config.model, self.tokenizer.fingerprint,
                    self.tokenizer.vocab_size)
            if config.journal_dir else None
        )
        self.counters = {
            "journal_sessions_restored_total": 0,
            "journal_errors_total": 0,  # writes that failed: those sessions are not journaled
            "entries_accepted_total": 0,
            "queries_started_total": 0,
            "tokens_generated_total": 0,
            "ring_full_waits_total": 0,  # times a producer was held back by a full ring
            "flash_rounds_total": 0,
            "flash_rounds_retried_total": 0,  # rounds that found no KV room and were asked again
            "flash_rounds_coalesced_total": 0,  # data that joined a round already asked for
            "flash_answers_published_total": 0,
        }

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.gc_freeze:
            _freeze_heap()
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
        if self.ring.closed:  # stopped already
            return
        self._accepting = False
        self.ready = False
        for board in self._flash.values():
            board.close(SHUTDOWN)
        deadline = self.loop.time() + drain_timeout
        while self._inflight and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._end_unfinished()
        self.worker.stop()
        await self.loop.run_in_executor(None, self.worker.join, 10.0)
        if self.config.gc_freeze:
            gc.unfreeze()  # what this engine held may be collected again
        if not self.worker.is_alive():
            self.ring.close()
        if self.journal is not None:
            self.journal.close()  # the files stay: the next start restores their sessions

    def _end_unfinished(self) -> None:
        """Queries still running when the drain ends: each client gets an error (retry
        elsewhere or later) rather than a connection dropped mid-answer, and the worker is
        told to drop them in the same turn (sent now: it stops right after)."""
        unfinished = list(self._inflight.items())
        self._inflight.clear()
        if unfinished:
            log.warning("the drain ended with %d answers unfinished; their clients get an error",
                        len(unfinished), extra={"cut_off_queries": len(unfinished)})
        shutdown = Overloaded(
            "the daemon shut down before this answer finished", retry_after=5.0
        )
        for query_id, (handle, blocks) in unfinished:
            self._commands.append(CancelQuery(query_id))
            handle.deliver([], None, shutdown)
            self._query_ended(query_id, blocks)
        if self._commands:
            self._send_commands()

    def _query_ended(self, query_id: int, blocks: int) -> None:
        """Gives back a finished query's blocks, and its session's pinned ones with the last
        query that read them."""
        self.budget.release(blocks)
        session = self._query_sessions.pop(query_id, None)
        if session is None:
            return
        session.forked -= 1
        if session.forked == 0 and session.pinned:
            self.budget.release(session.pinned)
            session.pinned = 0

    @property
    def worker_failed(self) -> bool:
        """The worker thread died: nothing this engine holds can be computed any more."""
        return self.worker.fatal is not None

    def worker_turn_age(self) -> float:
        """Seconds since the worker last made progress: began a turn or finished a step (an
        idle turn lasts at most ``IDLE_WAIT_S``; a growing age means it is stuck in a step)."""
        return time.monotonic() - self.worker.turn_started

    # ---- sessions ----------------------------------------------------------------------------
    async def init_session(self, req: InitRequest) -> SessionReply:
        self._check_accepting()
        if len(self.sessions) + len(self._opening) >= self.config.max_sessions:
            raise Overloaded(f"the daemon holds its limit of {self.config.max_sessions} sessions")
        session_id = new_session_id(req.session_id, self.sessions.keys() | self._opening)
        # held from here to the session's insertion: an init of the same id that arrives during
        # this one's awaits is refused, and the session limit counts this one
        self._opening.add(session_id)
        try:
            return await self._open_session(session_id, req)
        finally:
            self._opening.discard(session_id)

    async def _open_session(
        self, session_id: str, req: InitRequest, *, journaled: bool = True
    ) -> SessionReply:
        window = self._window(req.window)
        if req.template == "chat" and self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template; use template 'raw'")
        layout = await self._off_loop(
            build_layout, self.tokenizer, req.template, req.prompt, chars=len(req.prompt)
        )
        if len(layout.opening) >= window:
            raise TooLarge(f"the prompt takes {len(layout.opening)} tokens; the window is {window}")
        if len(req.flash) > self.config.max_flash_queries:
            raise InvalidRequest(
                f"a session holds at most {self.config.max_flash_queries} flash queries"
            )
        for i, spec in enumerate(req.flash):
            await self._check_flash_spec(spec, layout.question_suffix, f"flash[{i}].")
        blocks = self.budget.session_blocks(len(layout.opening))
        await self.conversations.make_room(blocks)
        self.budget.grow_live_session(0, blocks)
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
            literal_specials=req.special_tokens == "text",
        )
        try:  # one record: if this raises (or is cancelled), it was not written
            await self._write_records(
                [records.encode(records.Kind.OPEN, session.slot, 0, layout.opening)]
            )
        except BaseException:
            self.budget.release_live_session(blocks)
            raise
        self.sessions[session_id] = session
        self._by_slot[session.slot] = session
        board = self._open_flash_board(session_id)
        for spec in req.flash:
            board.register(spec)
        if journaled and self.journal is not None:
            init = msgspec.structs.replace(req, session_id=session_id, window=window, flash=[])
            saved = Saved(self.journal.header(init), flash=list(req.flash))
            self._journaled(session_id, lambda: self.journal.open(saved))
        return SessionReply(
            session_id=session_id,
            prompt_tokens=session.opening_tokens,
            template=req.template,
            format=req.format,
            window=window,
            special_tokens=req.special_tokens,
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
            del self._by_slot[session.slot]
            self._flash.pop(session_id).close()
            if self.journal is not None:
                self.journal.drop(session_id, delete=True)
            # shielded: a client gone mid-close must not leave the worker holding the session
            # while its blocks count as free (or the other way round)
            await asyncio.shield(self._write_close(session))

    async def _write_close(self, session: Session) -> None:
        await self._write_records([records.encode(records.Kind.CLOSE, session.slot)])
        if session.forked:  # its queries still read its blocks: freed when the last one ends
            self.budget.unhold(session.reserved_blocks)
            session.pinned += session.reserved_blocks
        else:
            self.budget.release_live_session(session.reserved_blocks)

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"unknown session {session_id!r}")
        return session

    # ---- the journal (journal_dir) -----------------------------------------------------------
    async def _restore_flash(self, session_id: str, spec: FlashSpec) -> bool:
        """A journaled flash query registered again; one today's settings refuse (a lower
        ``max_flash_queries``, a smaller ``max_new_tokens``) is dropped with a warning, and
        the session comes back without it."""
        session = self.sessions[session_id]
        try:
            await self._check_flash_spec(spec, session.question_suffix, "")
            self._flash[session_id].register(spec)
        except LiveLMError as exc:
            log.warning("session %s restored without its flash query %r: %s", session_id,
                        spec.query, exc, extra={"session_id": session_id})
            return False
        return True

    def _journal_of(self, session_id: str) -> SessionJournal | None:
        return None if self.journal is None else self.journal.sessions.get(session_id)

    def _journaled(self, session_id: str, write: Callable[[], object]) -> None:
        """Runs a journal write. One that fails ends the session's journal, file and all: a
        file missing what was acknowledged since would restore a session that silently lacks
        data. The session itself goes on."""
        try:
            write()
        except JournalError as exc:
            self.counters["journal_errors_total"] += 1
            log.error("journal write failed, session %s is no longer journaled: %s", session_id,
                      exc, extra={"session_id": session_id})
            if self.journal is not None:
                self.journal.drop(session_id, delete=True)

    async def restore_sessions(self) -> int:
        """Re-opens every journaled session with its id, window, seqs and flash queries, and
        queues its retained entries for the worker (they are ingested as any push is: queries
        on them wait for it). Returns how many came back; the others are set aside, logged."""
        if self.journal is None:
            return 0
        restored = 0
        for saved in self.journal.saved():
            try:
                await self._restore(saved)
            except (LiveLMError, JournalError) as exc:
                if self._journal_of(saved.session_id) is None and saved.session_id in self.sessions:
                    await self.close_session(saved.session_id)  # this one, half restored
                if saved.path is not None:
                    self.journal.set_aside(saved.path, str(exc))
                continue
            restored += 1
        self.counters["journal_sessions_restored_total"] += restored
        if restored:
            log.info("sessions restored from the journal", extra={"sessions": restored})
        return restored

    async def _restore(self, saved: Saved) -> None:
        new_session_id(saved.session_id, self.sessions.keys())  # a valid id, not taken
        await self._open_session(saved.session_id, saved.header.init, journaled=False)
        session = self.sessions[saved.session_id]
        self._flash[saved.session_id].hub.restored = True
        if saved.first_kept > 1:  # seqs go on from where they were
            session.last_seq = session.dropped = saved.first_kept - 1
            await self._write_records(
                [records.encode(records.Kind.TRIM, session.slot, saved.first_kept)]
            )
        entries = [tokens.tolist() for _, tokens in saved.entries]
        step = self.config.max_push_entries
        for at in range(0, len(entries), step):
            self._check_entry_sizes(session, entries[at:at + step])
            await self._accept(session, entries[at:at + step])
        saved.flash = [s for s in saved.flash if await self._restore_flash(saved.session_id, s)]
        self.journal.open(saved)  # rewritten with what is retained, and appended to from here

    # ---- data ----------------------------------------------------------------------------
    async def push(self, session_id: str, data: list[Any]) -> PushReply:
        self._check_accepting()
        session = self._session(session_id)
        if session.error is not None:  # its data would only queue up behind the failure
            raise InternalError(
                f"session {session_id!r} cannot take data: {session.error}; "
                "close it and open a new one"
            )
        if not data:
            raise InvalidRequest("data is empty: push at least one entry")
        if len(data) > self.config.max_push_entries:
            raise TooLarge(f"a push holds at most {self.config.max_push_entries} entries")
        lines = [render_entry(entry, session.format, i) for i, entry in enumerate(data)]
        encode = functools.partial(
            self.tokenizer.encode_batch, literal_specials=session.literal_specials
        )
        tokens = await self._off_loop(encode, lines, big=len(lines))
        self._check_entry_sizes(session, tokens)
        # from here the push completes or fails as a whole, even if its client goes away
        return await asyncio.shield(self._accept(session, tokens))

    async def _accept(self, session: Session, tokens: list[list[int]]) -> PushReply:
        async with session.lock:
            if self.sessions.get(session.session_id) is not session:
                raise UnknownSession(f"session {session.session_id!r} was closed")
            plan = session.plan_push([len(t) for t in tokens])
            needed = self.budget.session_blocks(session.opening_tokens + plan.data_tokens)
            trims = plan.first_kept_seq is not None
            pin = session.reserved_blocks if trims and session.forked else 0
            growth = max(0, needed - session.reserved_blocks)
            if growth or pin:
                await self.conversations.make_room(growth + pin)
            if pin:  # the rebuild after the trim comes beside the old blocks queries still read
                self.budget.pin(pin)
            if growth:
                try:
                    self.budget.grow_live_session(session.reserved_blocks, needed)
                except LiveLMError:
                    self.budget.release(pin)
                    raise
                session.reserved_blocks = needed
            session.pinned += pin
            words = []
            if plan.first_kept_seq is not None:
                words.append(records.encode(records.Kind.TRIM, session.slot, plan.first_kept_seq))
            words += [
                records.encode(records.Kind.DATA, session.slot, plan.first_seq + i, t)
                for i, t in enumerate(tokens)
            ]
            await self._write_records(words)
            session.commit(plan)
            if (journal := self._journal_of(session.session_id)) is not None:
                self._journaled(session.session_id,
                                lambda: journal.push(plan.first_seq, tokens, plan.first_kept_seq))
            if trims:  # the worker will recompute every retained entry: status says so now
                session.pending_tokens = max(session.pending_tokens, plan.data_tokens)
            session.acks.append((session.last_seq, time.monotonic()))
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
        """Writes a push's records in order. When they fit they go as one write, so the worker
        wakes once and sees them all: written one by one, it woke on the first and ran a
        whole step for that record alone before the rest."""
        async with self._ring_lock:
            if len(batch) > 1 and self.ring.write(np.concatenate(batch)):
                return
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
    async def ask(self, session_id: str, req: GenerateRequest) -> QueryHandle:
        """``generate`` for the transports: a long prompt (or long choices) is tokenized on a
        worker thread, so that it does not hold up every other client on the event loop."""
        texts = [req.prompt, *(req.choices or [])]
        if sum(len(text) for text in texts) <= TOKENIZE_OFF_LOOP_CHARS:
            return self.generate(session_id, req)
        self._check_accepting()
        self._session(session_id)  # fail fast, before the work
        encode = self.tokenizer.encode
        tokens = await self.loop.run_in_executor(None, lambda: [encode(t) for t in texts])
        encoded = dict(zip(texts, tokens, strict=True))
        return self.generate(session_id, req, encode=encoded.__getitem__)

    def generate(
        self,
        session_id: str,
        req: GenerateRequest,
        *,
        capture_logits: bool = False,
        use_flash_cache: bool = True,
        encode: Callable[[str], list[int]] | None = None,
    ) -> QueryHandle:
        """Starts a query; ``encode`` tokenizes its prompt and choices (default: the
        tokenizer, here on the loop: long inputs go through ``ask``)."""
        self._check_accepting()
        session = self._session(session_id)
        encode = encode or self.tokenizer.encode
        choices = self._choices(req, encode)
        params = self._sampling(req, choices)
        if session.error is not None:
            raise InternalError(
                f"session {session_id!r} cannot answer: {session.error}; close it and open a new one"
            )
        flash = self._flash[session_id]
        if use_flash_cache and (cached := flash.cached(req, session.last_seq)) is not None:
            return self._cached_handle(*cached)
        if not req.prompt.strip():  # on a chat session the template alone would be asked
            raise InvalidRequest("prompt is empty")
        question = encode(req.prompt) + session.question_suffix
        if len(question) > self.config.max_entry_tokens:
            raise TooLarge(
                f"the prompt takes {len(question)} tokens; at most {self.config.max_entry_tokens}"
            )
        context = session.context_tokens
        if context + len(question) + params.max_tokens > self.max_context:
            answer = "the longest choice" if choices is not None else "max_tokens"
            raise InvalidRequest(
                f"context ({context}) + prompt ({len(question)}) + {answer} ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_context} tokens"
            )
        state = QueryState(
            tokens=[],
            slot=session.slot,
            target_seq=session.last_seq,
            question=question,
            params=params,
            capture_logits=capture_logits,
            choices=choices,
        )
        return self.start_query(state, context)

    def start_query(self, state: QueryState, context: int) -> QueryHandle:
        """Admits ``state`` (its blocks over ``context`` tokens) and hands it to the worker."""
        new_tokens = len(state.question) + state.params.max_tokens
        if self.config.reprefill_queries:
            blocks = self.budget.session_blocks(context + new_tokens)
        else:
            blocks = self.budget.query_blocks(context, new_tokens)
        if state.choices is not None:
            blocks += scoring_blocks(self.budget, state.choices)
        if blocks > self.budget.available:
            self.conversations.make_room_soon(blocks)  # the retry will find them
        self.budget.reserve_query(blocks)
        state.query_id = next(self._query_ids)
        handle = QueryHandle(state.query_id, self._cancel)
        self._inflight[state.query_id] = (handle, blocks)
        session = self._by_slot.get(state.slot)  # None for a kept conversation's query
        if session is not None:
            session.forked += 1
            self._query_sessions[state.query_id] = session
        self._command(StartQuery(state))
        self.counters["queries_started_total"] += 1
        return handle

    async def complete(
        self, prompt_tokens: list[int], req: GenerateRequest, *, session_id: str | None = None
    ) -> Completion:
        """An answer that continues right after ``prompt_tokens`` (no template applied), over
        a session's context if ``session_id``, else reusing the KV of recent completions."""
        self._check_accepting()
        choices = self._choices(req)
        params = self._sampling(req, choices)
        if session_id is not None:
            session = self._session(session_id)
            return self.conversations.over_session(session, prompt_tokens, params, choices)
        return await self.conversations.complete(prompt_tokens, params, choices)

    def _choices(
        self, req: GenerateRequest, encode: Callable[[str], list[int]] | None = None
    ) -> Choices | None:
        if req.choices is None:
            return None
        return parse_choices(req, encode or self.tokenizer.encode, self.config.max_choices)

    def _sampling(self, req: GenerateRequest, choices: Choices | None = None) -> SamplingParams:
        """``choices``: a classification, whose answer is at most its longest choice."""
        limit = self.config.max_new_tokens
        if not 1 <= req.max_tokens <= limit:
            raise InvalidRequest(f"max_tokens must be between 1 and {limit}")
        if not (math.isfinite(req.temperature) and 0.0 <= req.temperature <= 100.0):
            raise InvalidRequest("temperature must be between 0 and 100")
        if not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
            raise InvalidRequest("top_p must be in (0, 1]")
        if req.top_k < 0:
            raise InvalidRequest("top_k must be 0 (off) or positive")
        if req.seed is not None and not -(2**63) <= req.seed < 2**64:
            raise InvalidRequest("seed must fit in 64 bits")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > self.config.max_stop_sequences or any(not s or len(s) > 256 for s in stop):
            raise InvalidRequest(
                f"stop takes at most {self.config.max_stop_sequences} non-empty strings of up to 256 characters"
            )
        return SamplingParams(
            max_tokens=req.max_tokens if choices is None else choices.longest,
            # below this, dividing the logits by it overflows, and the draw is greedy anyway
            temperature=req.temperature if req.temperature >= GREEDY_BELOW_TEMPERATURE else 0.0,
            top_p=req.top_p,
            top_k=0 if req.top_k >= self.model.config.vocab_size else req.top_k,  # keeps all
            seed=req.seed,
            stop=stop,
            eos_ids=self.model.eos_ids,
        )

    def _cancel(self, query_id: int) -> None:
        if query_id in self._inflight:
            self._command(CancelQuery(query_id))

    def _command(self, command: StartQuery | CancelQuery) -> None:
        if not self._commands:
            self.loop.call_soon(self._send_commands)
        self._commands.append(command)

    def _send_commands(self) -> None:
        commands, self._commands = self._commands, []
        if commands and not self.ring.closed:  # after stop() the worker and its ring are gone
            self.worker.submit(commands)

    # ---- flash queries and events -----------------------------------------------------------
    async def register_flash(self, session_id: str, spec: FlashSpec) -> FlashRegistered:
        self._check_accepting()
        session = self._session(session_id)
        await self._check_flash_spec(spec, session.question_suffix, "")
        registered = self._flash[session_id].register(spec)
        if (journal := self._journal_of(session_id)) is not None:
            self._journaled(session_id, lambda: journal.flash(spec))
        return registered

    def flash_answers(self, session_id: str) -> list[FlashAnswer]:
        self._session(session_id)
        return self._flash[session_id].answers()

    def subscribe(
        self, session_id: str, events: frozenset[str], last_event_id: int | None = None
    ) -> Subscription:
        """``events``: topics (``flash``, ``data``) or event names; empty = all."""
        self._session(session_id)
        return self._flash[session_id].hub.subscribe(event_names(events), last_event_id)

    def _open_flash_board(self, session_id: str) -> FlashBoard:
        def start(req: GenerateRequest) -> QueryHandle:
            return self.generate(session_id, req, capture_logits=True, use_flash_cache=False)

        hub = EventHub(session_id, self.config.event_buffer)
        board = FlashBoard(session_id, hub, start, self.config.max_flash_queries, self.counters)
        self._flash[session_id] = board
        return board

    async def _check_flash_spec(
        self, spec: FlashSpec, question_suffix: list[int], where: str
    ) -> None:
        if not spec.query.strip():
            raise InvalidRequest(f"{where}query is empty")
        limit = self.config.max_new_tokens
        if not 1 <= spec.max_tokens <= limit:
            raise InvalidRequest(f"{where}max_tokens must be between 1 and {limit}")
        tokens = await self._off_loop(self.tokenizer.encode, spec.query, chars=len(spec.query))
        size = len(tokens) + len(question_suffix)
        room = min(self.config.max_entry_tokens, self.max_context)
        if size + spec.max_tokens > room:
            raise TooLarge(
                f"{where}query takes {size} tokens; with max_tokens {spec.max_tokens} "
                f"that exceeds {room}"
            )

    def _cached_handle(self, done: DoneReply, tokens: list[TokenEvent]) -> QueryHandle:
        """A finished handle holding a flash answer: nothing goes to the worker."""
        handle = QueryHandle(next(self._query_ids), self._cancel)
        handle.deliver(tokens, done, None)
        return handle

    # ---- results from the worker -------------------------------------------------------------
    def _report_threadsafe(self, report: StepReport) -> None:
        self.loop.call_soon_threadsafe(self._apply_report, report)

    def _apply_report(self, report: StepReport) -> None:
        now = time.monotonic()
        for p in report.progress:
            session = self._by_slot.get(p.slot)
            if session is not None:
                # a window rebuild restarts the worker's count from the retained entries:
                # what clients see holds until the rebuild passes it (as the events do)
                session.ingested_seq = max(session.ingested_seq, p.ingested_seq)
                while session.acks and session.acks[0][0] <= p.ingested_seq:
                    self.latency.ingest.observe(now - session.acks.popleft()[1])
                session.computed_tokens = p.context_tokens
                session.pending_tokens = p.pending_tokens
                session.error = p.error
                if self.sessions.get(session.session_id) is session:  # not closed
                    self._flash[session.session_id].progress(p.ingested_seq, p.context_tokens)
        for query_id, update in report.queries.items():
            entry = self._inflight.get(query_id)
            if entry is None:
                continue
            handle, blocks = entry
            if update.first_logits is not None:
                handle.first_logits = update.first_logits
            if update.done is not None:
                self.counters["tokens_generated_total"] += update.done.usage.completion_tokens
            if not handle.answering and (update.tokens or update.done is not None):
                handle.answering = True
                self.latency.first_token.observe(now - handle.admitted_at)
            handle.deliver(update.tokens, update.done, update.error)
            if update.done is not None or update.error is not None:
                del self._inflight[query_id]
                self._query_ended(query_id, blocks)
                self.latency.answer.observe(now - handle.admitted_at)
        if report.ring_drained:
            self._ring_space.set()
        if report.delivered is not None:  # after the handles' readers have run (FIFO)
            self.loop.call_soon(report.delivered.set)

    # ---- helpers ----------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if not self._accepting:
            raise Overloaded("the daemon is shutting down", retry_after=5.0)
        if self.worker_failed:
            raise Overloaded("the inference worker stopped; see the daemon log", retry_after=5.0)

    async def _off_loop(self, fn: Any, *args: Any, big: int = 0, chars: int = 0) -> Any:
        """``fn(*args)`` on a thread for work over ``big`` entries or ``chars`` of text."""
        if big > TOKENIZE_OFF_LOOP_ENTRIES or chars > TOKENIZE_OFF_LOOP_CHARS:
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
            "worker_turn_seconds": self.worker_turn_age() if self.worker.is_alive() else 0.0,
            "worker_steps_total": float(self.worker.steps),
            "worker_graph_steps_total": float(self.worker.runner.graph_steps),
            "worker_eager_steps_total": float(self.worker.runner.eager_steps),
            "event_subscribers": sum(b.hub.subscribers for b in self._flash.values()),
            "flash_rounds_inflight": sum(b.round_running for b in self._flash.values()),
            **self._piece_cache_metrics(),
            **self.conversations.metrics(),
            **{k: float(v) for k, v in self.counters.items()},
        }

    def _piece_cache_metrics(self) -> dict[str, float]:
        cache = self.tokenizer.piece_cache
        if cache is None:
            return {}
        return {
            "token_cache_hits_total": float(cache.hits),
            "token_cache_misses_total": float(cache.misses),
        }


def _freeze_heap() -> None:
    """Collects once, then moves every live object (the model, compiled kernels, captured
    graphs, the tokenizer) to the collector's permanent generation. A full collection later
    walks only objects made since, so its pause stays short (it falls on whichever of the
    event loop and the worker thread allocates at the time, stalling every session)."""
    gc.collect()
    gc.freeze()
    log.info("gc frozen", extra={"frozen_objects": gc.get_freeze_count()})


def _drop_slow_data_graphs(graphs: StepGraphs) -> None:
    times = graphs.drop_slow_data_sizes()
    if times:
        log.info(
            "data graphs timed",
            extra={"kept": graphs.data_sizes,
                   "dropped": [n for n in times if n not in graphs.data_sizes],
                   "ms": {n: round(ms, 2) for n, ms in times.items()}},
        )


def _check_capturable(kernels: Kernels) -> None:
    """CUDA graphs replay every step's forward pass with the shapes and host values of their
    capture: a bound kernel that reads the batch's host-side lists would replay stale ones."""
    if kernels.graph_unsafe:
        raise ConfigError(
            f"cuda_graphs: true needs every forward kernel to be capturable, but the kernels "
            f"bound for {', '.join(sorted(kernels.graph_unsafe))} read host-side batch lists; "
            "let the kernel policy allow capturable ones (the Triton kernels are) or set "
            "cuda_graphs: false"
        )
