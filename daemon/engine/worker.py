"""The worker thread: owns the model, the KV pool and every device call.

Each turn it takes commands (queries, cancels) and ring records (sessions' data), forks the
queries whose data has arrived, asks the scheduler for a step, runs it, and hands tokens and
progress back to the event loop in one call per step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from livelm.daemon.engine import records
from livelm.daemon.engine.choices import normalised
from livelm.daemon.engine.detok import TextTracker
from livelm.daemon.engine.kv_manager import KVManager
from livelm.daemon.engine.prefix_branch import branch_session
from livelm.daemon.engine.runner import ModelRunner, PendingStep, StepOutput
from livelm.daemon.engine.scheduler import Chunk, Scheduler
from livelm.daemon.engine.sequence import ChoiceState, Phase, QueryState, SessionState
from livelm.daemon.kernels.transfer import to_device_async
from livelm.daemon.model.tokenizer import Tokenizer
from livelm.native.ring import Ring
from livelm.protocol.errors import InternalError, LiveLMError, UnknownSession
from livelm.protocol.messages import DoneReply, TokenEvent, Usage

log = logging.getLogger("livelm.worker")
IDLE_WAIT_S = 0.25
# how long the worker, with a decode step in flight, waits for the event loop to deliver the
# tokens it just reported before it launches the next step: without it, the loop (which needs
# the GIL) would deliver them only once that launch blocks, about half a millisecond later on
# an H100 host. The step in flight keeps the GPU busy meanwhile.
HANDOFF_WAIT_S = 0.001
RELEASE_AFTER_S = 0.0005  # idle: ended queries' blocks are freed after this first wait
PLACEHOLDER_TOKEN = 0  # stands for a token being drawn on the device while decoding ahead
# what a step raises when its inputs cannot be computed (device errors, out-of-memory, a token
# id outside the model's vocabulary, a setting no tensor can hold); it fails the step's
# sequences, not the worker
STEP_ERRORS = (RuntimeError, IndexError, OverflowError, ValueError, LiveLMError)


@dataclass(frozen=True)
class StartQuery:
    query: QueryState


@dataclass(frozen=True)
class CancelQuery:
    query_id: int


@dataclass
class QueryUpdate:
    tokens: list[TokenEvent] = field(default_factory=list)
    done: DoneReply | None = None
    error: LiveLMError | None = None
    first_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class Progress:
    slot: int
    ingested_seq: int
    context_tokens: int
    pending_tokens: int
    error: str | None = None  # set once computing the session's data failed


@dataclass(frozen=True)
class StepReport:
    queries: dict[int, QueryUpdate]
    progress: list[Progress]
    ring_drained: bool
    # set by the event loop once it has delivered the report (when the worker waits for that)
    delivered: threading.Event | None = None


class Worker(threading.Thread):
    def __init__(
        self,
        runner: ModelRunner,
        kv: KVManager,
        scheduler: Scheduler,
        ring: Ring,
        tokenizer: Tokenizer,
        max_context: int,
        report: Callable[[StepReport], None],
        reprefill: bool = False,
        run_ahead: bool = True,
    ) -> None:
        super().__init__(name="livelm-worker", daemon=True)
        self.runner, self.kv, self.scheduler, self.ring = runner, kv, scheduler, ring
        self.tokenizer = tokenizer
        self.max_context = max_context
        self._report = report
        self._reprefill = reprefill  # baseline mode: queries recompute their whole context
        # decode steps launch before the last one is read back (the engine sets it on CUDA
        # devices: on the CPU a launch computes the step, which would hold each token back)
        self.run_ahead = run_ahead
        self.steps_ahead = 0  # decode steps launched before their predecessor was read back
        self.steps = 0  # model steps launched, of any kind
        self.sessions: dict[int, SessionState] = {}
        self.queries: dict[int, QueryState] = {}
        self._trackers: dict[int, TextTracker] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._commands: queue.SimpleQueue[StartQuery | CancelQuery] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._updates: dict[int, QueryUpdate] = {}
        self._touched: set[int] = set()
        self._drained = False
        # ended queries whose KV blocks go back to the pool once their last tokens are
        # reported: when the worker goes idle, or at the start of its next turn
        self._finished: list[QueryState] = []
        self.fatal: BaseException | None = None
        self.turn_started = time.monotonic()  # last progress, read by the supervisor: stuck?

    # ---- called from the event loop thread ---------------------------------------------------
    def submit(self, commands: list[StartQuery | CancelQuery]) -> None:
        """Queues ``commands`` in order, then wakes the worker once, so that queries asked in
        the same loop turn start in the same worker turn (and prefill in one step)."""
        for command in commands:
            self._commands.put(command)
        self.ring.wake()

    def stop(self) -> None:
        self._stopping.set()
        self.ring.wake()

    # ---- the thread ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.turn_started = time.monotonic()
                self._turn()
        except BaseException as exc:  # the worker is gone: tell the loop so requests fail fast
            log.exception("worker thread died")
            self.fatal = exc
            self._fail_all(InternalError("the inference worker stopped; see the daemon log"))
            self._flush()

    def _turn(self) -> None:
        self._release_finished()
        self._take_commands()
        self._take_records()
        self._start_queries()
        queries = [
            q
            for q in self.queries.values()
            if q.phase in (Phase.PREFILL, Phase.DECODE, Phase.SCORE)
        ]
        sessions = [s for s in self.sessions.values() if s.error is None]
        awaited = {q.slot for q in self.queries.values() if q.phase is Phase.WAITING}
        chunks = self.scheduler.plan(sessions, queries, awaited)
        if chunks and self.run_ahead and self._answers_only(chunks):
            self._decode_ahead(chunks)
        elif chunks:
            self._step(chunks)
        self._flush()
        if not chunks or self._idle():  # straight to sleep: the loop gets the GIL at once
            self._sleep()

    def _take_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, StartQuery):
                self._add_query(command.query)
            elif command.query_id in self.queries:
                self._finish(self.queries[command.query_id], "cancelled")

    def _add_query(self, q: QueryState) -> None:
        self.queries[q.query_id] = q
        self._trackers[q.query_id] = TextTracker(self.tokenizer, q.params.stop)
        self._generators[q.query_id] = q.params.make_generator(self.runner.device)

    def _take_records(self) -> None:
        used = self.ring.used
        if used == 0:
            return
        for rec in records.decode_all(self.ring.read(used)):
            self._apply(rec)
        self._drained = True

    def _apply(self, rec: records.Record) -> None:
        if rec.kind is records.Kind.OPEN:
            self.sessions[rec.slot] = SessionState(
                tokens=rec.tokens, slot=rec.slot, opening_len=len(rec.tokens)
            )
        elif rec.kind is records.Kind.CLOSE:
            self._close(rec.slot)
        elif rec.kind is records.Kind.BRANCH:
            source = self.sessions[rec.arg]
            self.sessions[rec.slot] = branch_session(self.kv, source, rec.slot, rec.tokens)
        else:
            session = self.sessions[rec.slot]
            if rec.kind is records.Kind.DATA and rec.arg >= session.first_kept_seq:
                session.append_entry(rec.arg, rec.tokens)
            elif rec.kind is records.Kind.TRIM and session.trim(rec.arg):
                self.kv.truncate(session, session.num_computed)
        self._touched.add(rec.slot)

    def _close(self, slot: int) -> None:
        session = self.sessions.pop(slot)
        self.kv.release(session)
        for q in list(self.queries.values()):
            if q.slot == slot and q.phase is Phase.WAITING:
                self._fail(q, UnknownSession("the session was closed"))

    def _start_queries(self) -> None:
        # a query's OPEN record precedes it in the ring, so a missing session was closed
        with self.kv.batched_copies():
            for q in list(self.queries.values()):
                if q.phase is not Phase.WAITING:
                    continue
                session = self.sessions.get(q.slot)
                if session is None:
                    self._fail(q, UnknownSession("the session was closed"))
                elif session.error is not None:
                    self._fail(q, _session_failed(session.error))
                elif session.caught_up(q.target_seq):
                    self._fork(q, session)

    def _fork(self, q: QueryState, session: SessionState) -> None:
        limit = self.max_context - len(q.question) - q.params.max_tokens
        if q.fork_at is not None:
            limit = min(limit, q.fork_at)
        length, data_seq = session.boundary(limit)
        if self._reprefill:
            q.base, q.tokens, q.num_computed = 0, session.tokens[:length] + q.question, 0
        else:
            self.kv.fork(session, length, into=q)
            q.base, q.tokens = length, list(q.question)
        q.context_len, q.data_seq = length, data_seq
        q.phase = Phase.PREFILL

    # ---- one step ------------------------------------------------------------------------
    def _step(self, chunks: list[Chunk]) -> None:
        try:
            out = self._run(chunks)
        except STEP_ERRORS as exc:
            if len(chunks) == 1:
                self._step_failed(chunks[0], exc)
                return
            # one bad sequence must not fail the others: run them alone to find it
            log.warning(
                "a step of %d chunks failed (%s); running them one by one", len(chunks), exc
            )
            for ch in chunks:
                if self._live(ch.seq):
                    self._step([ch])
            return
        self._apply_step(chunks, out)

    def _run(self, chunks: list[Chunk]) -> StepOutput:
        self.steps += 1
        sampling = [ch.seq for ch in chunks if ch.sample]
        for ch in chunks:
            self.kv.prepare_write(ch.seq, ch.start, ch.start + ch.length)
        return self.runner.run(
            chunks,
            [q.params for q in sampling],
            [self._generators[q.query_id] for q in sampling],
        )

    def _apply_step(self, chunks: list[Chunk], out: StepOutput) -> None:
        for ch in chunks:
            ch.seq.num_computed = ch.start + ch.length
            if isinstance(ch.seq, SessionState):
                ch.seq.advance_ingested()
                self._touched.add(ch.seq.slot)
        self._add_scores([ch.seq for ch in chunks if ch.score], out.scores)
        sampling = [ch.seq for ch in chunks if ch.sample]
        for i, q in enumerate(sampling):
            if q.choices is not None:
                self._start_scoring(q, out.logits[i])
            else:
                first = out.logits[i] if q.capture_logits and not q.output else None
                self._on_token(q, out.tokens[i], first)

    # ---- decoding ahead ----------------------------------------------------------------------
    def _decode_ahead(self, chunks: list[Chunk]) -> None:
        """Decode steps back to back, each launched before the previous one's tokens are read:
        the next step's input ids are the previous step's sampled tokens, copied on the device,
        so reading tokens back, reporting and staging overlap the GPU's work. The first step
        may be the questions' own (their last chunks), so the first answer token's read-back
        and report overlap the second token's step. It goes on while nothing else waits (no
        command, no ring record, no session data to ingest); a query that ends meanwhile (a
        stop token or string, a cancel) wastes one row of the step in flight, whose result for
        it is dropped."""
        try:
            for ch in chunks:
                self.kv.prepare_write(ch.seq, ch.start, ch.start + ch.length)
            pending = self._launch_decode(chunks, None)
        except STEP_ERRORS:
            self._step(chunks)  # again the ordinary way, which fails what must fail
            return
        while True:
            ahead, feed = self._continuation(chunks, pending) if self._quiet() else ([], None)
            pending_ahead = None
            if ahead:
                try:
                    pending_ahead = self._launch_decode(ahead, feed)
                    self.steps_ahead += 1
                except STEP_ERRORS as exc:
                    log.warning("launching a decode step ahead failed (%s); stepping singly", exc)
                    self._drop_placeholders(ahead)
            try:
                out = pending.collect()
            except STEP_ERRORS as exc:
                for ch in chunks:
                    self._step_failed(ch, exc)
                out = None
            if out is not None:
                live = [ch for ch in chunks if self._live(ch.seq)]
                self._apply_step(live, _rows_of(out, chunks, live))
            self._flush(handoff=pending_ahead is not None)
            # a step done is progress: decode-ahead can hold one turn for a whole answer, and
            # the supervisor must not take a long answer for a stuck worker
            self.turn_started = time.monotonic()
            if pending_ahead is None:
                return
            chunks, pending = ahead, pending_ahead

    def _answers_only(self, chunks: list[Chunk]) -> bool:
        """Every chunk samples an answer token: a decode row, or a question's last chunk
        (unless its first logits are wanted: a read-back step returns tokens only)."""
        return all(
            isinstance(ch.seq, QueryState) and ch.sample and ch.seq.choices is None
            and ch.start + ch.length == ch.seq.length
            and (ch.seq.phase is Phase.DECODE and ch.length == 1
                 or ch.seq.phase is Phase.PREFILL and not ch.seq.capture_logits)
            for ch in chunks
        )

    def _sleep(self) -> None:
        """Waits for work. Ended queries' blocks are freed after a short first wait, once the
        loop has had the GIL to deliver their last tokens (or at once if work arrives)."""
        if self._finished:
            self.ring.wait(RELEASE_AFTER_S)
            self._release_finished()
            if not self._quiet():  # that wait answered a wake: do not sleep through its work
                return
        self.ring.wait(IDLE_WAIT_S)

    def _idle(self) -> bool:
        """Nothing to do until something arrives: no query at all (one waiting for its
        session's data may be ready to fork now that a step has ingested it), nothing to
        ingest, no command."""
        return not self.queries and self._quiet()

    def _quiet(self) -> bool:
        return (
            self._commands.empty()
            and self.ring.used == 0
            and not any(s.pending > 0 and s.error is None for s in self.sessions.values())
        )

    def _continuation(
        self, chunks: list[Chunk], pending: PendingStep
    ) -> tuple[list[Chunk], torch.Tensor | None]:
        """The next decode step of the chunks' queries that will still be answering after the
        step in flight (as far as the host can tell), each with a placeholder for the token it
        is drawing; and their input ids on the device."""
        ahead, rows = [], []
        for i, ch in enumerate(chunks):
            q = ch.seq
            if not self._live(q) or len(q.output) + 2 > q.params.max_tokens:
                continue  # the step in flight draws its last token (or it is gone)
            start = ch.start + ch.length
            try:
                self.kv.prepare_write(q, start, start + 1)
            except STEP_ERRORS:
                continue  # out of blocks, say: it steps the ordinary way next turn
            q.tokens.append(PLACEHOLDER_TOKEN)
            ahead.append(Chunk(q, start, 1, True))
            rows.append(i)
        if not ahead:
            return [], None
        if len(rows) == len(chunks):
            return ahead, pending.tokens
        index = to_device_async(torch.tensor(rows, dtype=torch.int64), pending.tokens.device)
        return ahead, pending.tokens.index_select(0, index)

    def _launch_decode(self, chunks: list[Chunk], feed: torch.Tensor | None) -> PendingStep:
        """Launches a decode step whose positions are already writable (``prepare_write``)."""
        self.steps += 1
        queries = [ch.seq for ch in chunks]
        return self.runner.launch_decode(
            chunks,
            [q.params for q in queries],
            [self._generators[q.query_id] for q in queries],
            feed,
        )

    def _drop_placeholders(self, ahead: list[Chunk]) -> None:
        for ch in ahead:
            if ch.seq.length == ch.start + 1:
                ch.seq.tokens.pop()

    def _live(self, seq: SessionState | QueryState | ChoiceState) -> bool:
        if isinstance(seq, SessionState):
            return self.sessions.get(seq.slot) is seq and seq.error is None
        return seq.query_id in self.queries

    def _step_failed(self, ch: Chunk, exc: Exception) -> None:
        log.error("step failed", exc_info=exc)
        if isinstance(ch.seq, SessionState):
            ch.seq.error = f"computing the session's data failed: {type(exc).__name__}: {exc}"
            self._touched.add(ch.seq.slot)
            return
        query = self.queries.get(ch.seq.query_id)
        if query is not None:
            self._fail(query, InternalError(f"computing the answer failed: {exc}"))

    # ---- classification ----------------------------------------------------------------------
    def _start_scoring(self, q: QueryState, logits: torch.Tensor) -> None:
        """The question is in: score each choice's first token, then fork the multi-token ones."""
        update = self._update(q)
        if q.capture_logits:
            update.first_logits = logits.cpu()
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        firsts = torch.tensor(q.choices.first_tokens(), dtype=torch.int64, device=logits.device)
        q.choice_logprobs = logprobs.index_select(0, firsts).tolist()
        q.scoring = [
            self._fork_choice(q, i, tokens)
            for i, tokens in enumerate(q.choices.tokens)
            if len(tokens) > 1
        ]
        if q.scoring:
            q.phase = Phase.SCORE
        else:
            self._finish_choice(q)

    def _fork_choice(self, q: QueryState, index: int, tokens: tuple[int, ...]) -> ChoiceState:
        fork = ChoiceState(
            tokens=list(tokens[:-1]), query_id=q.query_id, index=index, targets=list(tokens[1:])
        )
        self.kv.fork(q, q.length, into=fork)
        fork.base = q.length
        return fork

    def _add_scores(self, forks: list[ChoiceState], scores: list[list[float]]) -> None:
        scored: dict[int, QueryState] = {}
        for fork, logprobs in zip(forks, scores, strict=True):
            q = self.queries[fork.query_id]
            q.choice_logprobs[fork.index] += sum(logprobs)
            scored[q.query_id] = q
        for q in scored.values():
            if all(f.pending == 0 for f in q.scoring):
                self._finish_choice(q)

    def _finish_choice(self, q: QueryState) -> None:
        logprobs = q.choice_logprobs
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        text, tokens = q.choices.texts[best], list(q.choices.tokens[best])
        update = self._update(q)
        # the events' texts add up to the reply's text, as for a generated answer
        update.tokens += [TokenEvent(text="", token=t) for t in tokens[:-1]]
        update.tokens.append(TokenEvent(text=text, token=tokens[-1]))
        update.done = DoneReply(
            text=text,
            tokens=tokens,
            finish_reason="stop",
            usage=Usage(
                prompt_tokens=len(q.question),
                completion_tokens=len(tokens),
                context_tokens=q.context_len,
            ),
            data_seq=q.data_seq,
            cached=False,
            choice=text,
            probs=dict(zip(q.choices.texts, normalised(logprobs), strict=True)),
        )
        self._trackers.pop(q.query_id, None)
        self._drop(q)

    # ---- generation --------------------------------------------------------------------------
    def _on_token(self, q: QueryState, token: int, logits: torch.Tensor | None) -> None:
        update = self._update(q)
        if logits is not None:
            update.first_logits = logits.cpu()
        q.phase = Phase.DECODE
        if token in q.params.eos_ids:
            self._finish(q, "stop")
            return
        q.output.append(token)
        tracker = self._trackers[q.query_id]
        update.tokens.append(TokenEvent(text=tracker.update(q.output), token=token))
        if tracker.stopped:
            self._finish(q, "stop")
        elif len(q.output) >= q.params.max_tokens:
            self._finish(q, "length")
        elif q.length > q.num_computed:  # decoding ahead left a placeholder for this token
            q.tokens[q.num_computed - q.base] = token
        else:
            q.tokens.append(token)

    # ---- ending queries ------------------------------------------------------------------
    def _finish(self, q: QueryState, reason: str) -> None:
        tracker = self._trackers.pop(q.query_id)
        rest = tracker.finish()
        update = self._update(q)
        if rest and update.tokens and update.tokens[-1].token is not None:
            last = update.tokens[-1]
            update.tokens[-1] = TokenEvent(text=last.text + rest, token=last.token)
        elif rest:  # held-back text with no token of this step to carry it
            update.tokens.append(TokenEvent(text=rest, token=None))
        update.done = DoneReply(
            text=tracker.text,
            tokens=list(q.output),
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=len(q.question),
                completion_tokens=len(q.output),
                context_tokens=q.context_len,
            ),
            data_seq=q.data_seq,
            cached=False,
        )
        self._drop(q)

    def _fail(self, q: QueryState, error: LiveLMError) -> None:
        self._update(q).error = error
        self._trackers.pop(q.query_id, None)
        self._drop(q)

    def _drop(self, q: QueryState) -> None:
        q.phase = Phase.DONE
        self._finished.append(q)
        self._generators.pop(q.query_id, None)
        del self.queries[q.query_id]

    def _release_finished(self) -> None:
        """The KV blocks of the queries that ended since the last release. Steps launched
        since may still read them, but they are queued on the stream before any step that
        can reuse the blocks."""
        for q in self._finished:
            self.kv.release(q)
            for fork in q.scoring:
                self.kv.release(fork)
            q.scoring = []
        self._finished.clear()

    def _fail_all(self, error: LiveLMError) -> None:
        for q in list(self.queries.values()):
            self._fail(q, error)

    # ---- reporting ---------------------------------------------------------------------------
    def _update(self, q: QueryState) -> QueryUpdate:
        return self._updates.setdefault(q.query_id, QueryUpdate())

    def _flush(self, handoff: bool = False) -> None:
        """Reports the step's tokens and the sessions' progress to the event loop. With
        ``handoff`` (a step in flight), waits until the loop has delivered the tokens (at most
        ``HANDOFF_WAIT_S``)."""
        progress = []
        for slot in self._touched:
            s = self.sessions.get(slot)
            if s is None:
                continue
            now = (s.ingested_seq, s.num_computed, s.pending, s.error)
            if now != s.reported:
                s.reported = now
                progress.append(Progress(slot, *now))
        self._touched.clear()
        if not (self._updates or progress or self._drained):
            return
        # a fresh event each time: a late signal for an earlier report must not end this wait
        delivered = threading.Event() if handoff and self._updates else None
        self._report(StepReport(self._updates, progress, self._drained, delivered))
        self._updates, self._drained = {}, False
        if delivered is not None:  # releases the GIL: the loop takes it and delivers
            delivered.wait(HANDOFF_WAIT_S)


def _rows_of(out: StepOutput, chunks: list[Chunk], live: list[Chunk]) -> StepOutput:
    """``out`` restricted to the ``live`` chunks (a sub-list of ``chunks``, in order)."""
    if len(live) == len(chunks):
        return out
    keep = {id(ch) for ch in live}
    return StepOutput([t for t, ch in zip(out.tokens, chunks, strict=True) if id(ch) in keep], None)


def _session_failed(error: str) -> InternalError:
    return InternalError(f"the session cannot answer: {error}; close it and open a new one")
