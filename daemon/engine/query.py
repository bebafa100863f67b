"""The event-loop side of one query: streamed tokens, the final reply, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import torch

from livelm.protocol.errors import LiveLMError
from livelm.protocol.messages import DoneReply, TokenEvent


class QueryHandle:
    """Filled by the worker (through the loop thread); read by a transport."""

    def __init__(self, query_id: int, on_cancel: Callable[[int], None]) -> None:
        self.query_id = query_id
        self._on_cancel = on_cancel
        self._events: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        self._done: asyncio.Future[DoneReply] = asyncio.get_running_loop().create_future()
        self.first_logits: torch.Tensor | None = None  # set when asked for (tests, diagnostics)
        self.admitted_at = time.monotonic()
        self.answering = False  # a first token (or the whole answer) has been delivered

    # ---- filled on the loop thread ---------------------------------------------------------
    def deliver(
        self, tokens: list[TokenEvent], done: DoneReply | None, error: LiveLMError | None
    ) -> None:
        for event in tokens:
            self._events.put_nowait(event)
        if self._done.done():
            return
        if error is not None:
            self._done.set_exception(error)
            # marked as seen: a reader still there gets it from result(); one gone (a cancelled
            # request, a flash round of a closed session) leaves no "never retrieved" log
            self._done.exception()
            self._events.put_nowait(None)
        elif done is not None:
            self._done.set_result(done)
            self._events.put_nowait(None)

    # ---- read by transports -----------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._events.get()
            if event is None:
                if self._done.done() and self._done.exception() is not None:
                    raise self._done.exception()
                return
            yield event

    async def result(self) -> DoneReply:
        return await asyncio.shield(self._done)

    def on_done(self, callback: Callable[[BaseException | None], None]) -> None:
        """Calls ``callback(error)`` on the loop once the query ends (error: None unless it failed)."""
        self._done.add_done_callback(lambda done: callback(done.exception()))

    @property
    def finished(self) -> bool:
        return self._done.done()

    def cancel(self) -> None:
        if not self._done.done():
            self._on_cancel(self.query_id)
