"""``livelm query`` (one question over the session's context) and ``livelm status``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from livelm.client.base import compact
from livelm.client.cli_verbs import open_client
from livelm.client.replies import DoneReply


async def query(args: argparse.Namespace) -> int:
    options = compact(
        max_tokens=args.max_tokens, temperature=args.temperature, choices=args.choices
    )
    async with await open_client(args) as client:
        if args.stream:
            stream = client.stream_generate(args.session, args.question, **options)
            try:
                async for text in stream:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                await stream.result()
            finally:  # also when stdout closes (BrokenPipeError): the stream ends here
                await stream.aclose()
            sys.stdout.write("\n")
        else:
            done = await client.generate(args.session, args.question, **options)
            print(_to_json(done) if args.json else _answer(done))
    return 0


async def status(args: argparse.Namespace) -> int:
    async with await open_client(args) as client:
        reply = await client.status(args.session)
    fields = msgspec.structs.asdict(reply)
    if args.json:
        print(_to_json(fields))
        return 0
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        if value is not None:
            print(f"{name:<{width}}  {value}")
    return 0


def _answer(done: DoneReply) -> str:
    """The chosen label when classifying, else the answer's text."""
    return done.choice if done.choice is not None else done.text


def _to_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()
