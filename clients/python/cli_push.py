"""``livelm push``: entries from a JSONL or CSV file (or stdin) into a session, batch by batch,
each batch acknowledged before the next is sent (so the daemon's backpressure holds us back)."""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import msgspec

from livelm.client.base import ClientBase
from livelm.client.cli_verbs import UsageError, open_client
from livelm.client.entries_input import (
    ENCODING,
    checked,
    count_entries,
    input_kind,
    numbered_entries,
    open_input,
)
from livelm.client.entry_feed import EntryFeed
from livelm.daemon.progress import Progress
from livelm.protocol.errors import InvalidRequest, UnknownSession

# the daemon names a refused entry by its index in the push: "data[12].h: missing"
_ENTRY_INDEX = re.compile(r"^data\[(\d+)\]\.?")


async def push(args: argparse.Namespace) -> int:
    if args.init_prompt is None and (args.template or args.format):
        raise UsageError("--template and --format apply when --init-prompt creates the session")
    kind = input_kind(args.file, args.input)
    check = _sendable_check(args.transport)
    total = None if args.file == "-" else _count(Path(args.file), kind, check)
    with ExitStack() as stack:
        stream = _stdin() if args.file == "-" else stack.enter_context(_open(args.file))
        client = await open_client(args)
        try:
            if args.init_prompt is not None:
                await _init_unless_open(client, args)
            feed = EntryFeed(checked(numbered_entries(stream, kind), check), args.batch)
            pushed, seq = await _push_all(client, args, feed, total)
        finally:
            await client.aclose()
    print(f"pushed {pushed} entries to {args.session}; last seq {seq}")
    return 0


async def _init_unless_open(client: ClientBase, args: argparse.Namespace) -> None:
    """Creates the session; one already open (an earlier run of the same command) is pushed
    into, if its template and format are the ones asked for."""
    try:
        status = await client.status(args.session)
    except UnknownSession:
        await client.init(
            args.init_prompt, session_id=args.session, template=args.template, format=args.format
        )
        return
    for name in ("template", "format"):
        wanted, has = getattr(args, name), getattr(status, name)
        if wanted is not None and wanted != has:
            raise UsageError(
                f"session {args.session} is open with {name} {has!r}, not {wanted!r}; close it "
                "first, or push without --init-prompt"
            )
    print(f"livelm push: session {args.session} is open already; pushing into it", file=sys.stderr)


async def _push_all(
    client: ClientBase, args: argparse.Namespace, feed: EntryFeed, total: int | None
) -> tuple[int, int | None]:
    pushed, seq = 0, None
    bar = Progress(total or 0, f"push {args.session}", enabled=total is not None and not args.quiet)
    with bar:
        try:
            while batch := await feed.next_batch():
                lines = [line for line, _ in batch]
                seq = await _push_batch(client, args.session, [entry for _, entry in batch], lines)
                pushed += len(batch)
                bar.update(len(batch))
        except ValueError as exc:  # InputError, UnicodeDecodeError
            _report_partial(pushed, seq)
            raise UsageError(f"{args.file}: {exc}") from exc
        except BaseException:
            _report_partial(pushed, seq)
            raise
    return pushed, seq


async def _push_batch(
    client: ClientBase, session_id: str, entries: list[Any], lines: list[int]
) -> int:
    try:
        return await client.push(session_id, entries)
    except InvalidRequest as exc:
        raise _with_line(exc, lines) from exc


def _with_line(exc: InvalidRequest, lines: list[int]) -> InvalidRequest:
    """The daemon's error naming the input line of the refused entry, not its index in the
    batch (``data[234].h: missing`` -> ``line 1235: h: missing``)."""
    match = _ENTRY_INDEX.match(exc.message)
    if match is None or int(match.group(1)) >= len(lines):
        return exc
    line = lines[int(match.group(1))]
    rest = exc.message[match.end() :]
    joined = rest if rest.startswith((":", " ")) else f": {rest}"
    return InvalidRequest(f"line {line}{joined}", retry_after=exc.retry_after)


def _sendable_check(transport: str) -> Callable[[Any], None]:
    """Refuses an entry the transport's encoding cannot hold (MessagePack over TCP and
    WebSocket takes no int of 2**64 or more), so that it is a bad line, found before pushing."""
    encode = msgspec.json.encode if transport == "http" else msgspec.msgpack.encode
    encoding = "JSON" if transport == "http" else "MessagePack"

    def check(entry: Any) -> None:
        try:
            encode(entry)
        except (OverflowError, ValueError, msgspec.EncodeError) as exc:
            raise ValueError(f"cannot be sent over {transport} ({encoding}): {exc}") from exc

    return check


def _report_partial(pushed: int, seq: int | None) -> None:
    if pushed:
        print(f"livelm push: {pushed} entries were pushed (last seq {seq})", file=sys.stderr)


def _count(path: Path, kind: str, check: Callable[[Any], None]) -> int:
    try:
        return count_entries(path, kind, check)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # InputError, UnicodeDecodeError
        raise UsageError(f"{path}: {exc}") from exc


def _open(path: str) -> TextIO:
    try:
        return open_input(Path(path))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _stdin() -> TextIO:
    """stdin as the files are read: UTF-8 with or without a byte order mark, lines as sent."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding=ENCODING, newline="")
