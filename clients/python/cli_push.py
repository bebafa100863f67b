"""``livelm push``: entries from a JSONL or CSV file (or stdin) into a session, batch by batch,
each batch acknowledged before the next is sent (so the daemon's backpressure holds us back)."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from livelm.client.base import ClientBase
from livelm.client.cli_verbs import UsageError, open_client
from livelm.client.entries_input import count_entries, input_kind, read_entries
from livelm.client.entry_feed import EntryFeed
from livelm.daemon.progress import Progress


async def push(args: argparse.Namespace) -> int:
    if args.init_prompt is None and (args.template or args.format):
        raise UsageError("--template and --format apply when --init-prompt creates the session")
    kind = input_kind(args.file, args.input)
    total = None if args.file == "-" else _count(Path(args.file), kind)
    with ExitStack() as stack:
        stream = sys.stdin if args.file == "-" else stack.enter_context(_open(args.file))
        client = await open_client(args)
        try:
            if args.init_prompt is not None:
                await client.init(
                    args.init_prompt,
                    session_id=args.session,
                    template=args.template,
                    format=args.format,
                )
            feed = EntryFeed(read_entries(stream, kind), args.batch)
            pushed, seq = await _push_all(client, args, feed, total)
        finally:
            await client.aclose()
    print(f"pushed {pushed} entries to {args.session}; last seq {seq}")
    return 0


async def _push_all(
    client: ClientBase, args: argparse.Namespace, feed: EntryFeed, total: int | None
) -> tuple[int, int | None]:
    pushed, seq = 0, None
    bar = Progress(total or 0, f"push {args.session}", enabled=total is not None and not args.quiet)
    with bar:
        try:
            while batch := await feed.next_batch():
                seq = await client.push(args.session, batch)
                pushed += len(batch)
                bar.update(len(batch))
        except ValueError as exc:  # InputError, UnicodeDecodeError
            _report_partial(pushed, seq)
            raise UsageError(f"{args.file}: {exc}") from exc
        except BaseException:
            _report_partial(pushed, seq)
            raise
    return pushed, seq


def _report_partial(pushed: int, seq: int | None) -> None:
    if pushed:
        print(f"livelm push: {pushed} entries were pushed (last seq {seq})", file=sys.stderr)


def _count(path: Path, kind: str) -> int:
    try:
        return count_entries(path, kind)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # InputError, UnicodeDecodeError
        raise UsageError(f"{path}: {exc}") from exc


def _open(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed by the ExitStack
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
