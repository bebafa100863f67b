"""Entries read by a thread and taken by the event loop in batches of whatever is ready.

A batch holds at least one entry and at most ``size``: a file read fast gives full batches, a
live pipe (``tail -f feed.jsonl | livelm push ...``) gives each entry as soon as its line is in.
The queue between them is bounded, so a slow daemon holds the reader back (and so the pipe).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

POLL_SECONDS = 0.5  # a waiting executor thread gives up this often, so shutdown never hangs
QUEUE_BATCHES = 4  # batches read ahead


@dataclass(frozen=True)
class _End:
    error: BaseException | None  # why reading stopped; None at the end of the input


class EntryFeed:
    def __init__(self, entries: Iterator[Any], size: int) -> None:
        self.size = size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size * QUEUE_BATCHES)
        self._ended = False
        self._error: BaseException | None = None  # raised once the entries before it are out
        thread = threading.Thread(target=self._read, args=(entries,), daemon=True)
        thread.start()

    async def next_batch(self) -> list[Any]:
        """The next entries; an empty list at the end; raises the reader's error (after the
        entries read before it)."""
        if self._error is not None:
            raise self._error
        if self._ended:
            return []
        batch = [await self._first()]
        while len(batch) < self.size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return self._until_end(batch)

    async def _first(self) -> Any:
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass  # nothing ready: wait in a thread below
            try:
                return await asyncio.to_thread(self._queue.get, timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def _until_end(self, batch: list[Any]) -> list[Any]:
        for index, item in enumerate(batch):
            if isinstance(item, _End):
                self._ended = True
                self._error = item.error
                if index == 0 and self._error is not None:
                    raise self._error
                return batch[:index]
        return batch

    def _read(self, entries: Iterator[Any]) -> None:
        try:
            for entry in entries:
                self._queue.put(entry)
        except (ValueError, OSError) as exc:  # InputError, UnicodeDecodeError, a read error
            self._queue.put(_End(exc))
            return
        self._queue.put(_End(None))
