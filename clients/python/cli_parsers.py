"""The client subcommands of ``livelm``: push, query, watch, status (flags only; the work is
in ``cli_verbs``, imported when a verb runs)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from livelm.client.entries_input import INPUT_KINDS

TRANSPORTS = ("tcp", "ws", "http")
FORMATS = ("text", "json", "ohlcv", "kv")
DEFAULT_BATCH = 500


def add_client_parsers(commands: argparse._SubParsersAction) -> None:
    common = _common_flags()
    _add_push(commands, common)
    _add_query(commands, common)
    _add_watch(commands, common)
    _add_status(commands, common)


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--host", default="127.0.0.1", help="daemon address (default 127.0.0.1)")
    group.add_argument(
        "--port", type=int, default=8080, metavar="PORT", help="HTTP/WebSocket port (8080)"
    )
    group.add_argument(
        "--tcp-port", type=int, default=8081, metavar="PORT", help="framed TCP port (8081)"
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("LIVELM_API_KEY"),
        metavar="KEY",
        help="API key (default: $LIVELM_API_KEY)",
    )
    common.add_argument("--session", required=True, metavar="ID", help="the session id")
    return common


def _transport(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--transport", choices=TRANSPORTS, default=default, help=f"how to talk (default {default})"
    )


def _add_push(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    push = commands.add_parser(
        "push",
        parents=[common],
        help="push JSONL or CSV entries into a session",
        description="Push entries (JSONL: one JSON value a line; CSV: one object a row, keyed "
        "by the header) from FILE or stdin (-), in batches, each awaiting its ack.",
    )
    push.add_argument("file", metavar="FILE|-", help="input file, or - for stdin")
    push.add_argument("--input", choices=INPUT_KINDS, default="auto", help="auto: by suffix")
    push.add_argument(
        "--batch", type=_positive, default=DEFAULT_BATCH, metavar="N", help="entries a push at most"
    )
    push.add_argument("--init-prompt", metavar="P", help="first create the session with prompt P")
    push.add_argument("--template", choices=("chat", "raw"), help="with --init-prompt")
    push.add_argument("--format", choices=FORMATS, help="entry format, with --init-prompt")
    push.add_argument("--quiet", action="store_true", help="no progress bar")
    _transport(push, "tcp")
    push.set_defaults(run=_run("push"))


def _add_query(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    query = commands.add_parser(
        "query", parents=[common], help="ask a question over a session's context"
    )
    query.add_argument("question")
    query.add_argument("--max-tokens", type=_positive, metavar="N", help="answer length limit")
    query.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default)")
    query.add_argument("--choices", type=_choices, metavar="A,B,C", help="classify: pick one")
    output = query.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print tokens as they come")
    output.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    _transport(query, "http")
    query.set_defaults(run=_run("query"))


def _add_watch(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    watch = commands.add_parser(
        "watch",
        parents=[common],
        help="print flash answers live as they change",
        description="Print a session's flash answers as they change, until the session closes "
        "(over SSE by default, resuming after a dropped connection).",
    )
    watch.add_argument("--flash", action="append", metavar="Q", help="register flash query Q")
    watch.add_argument(
        "--max-tokens", type=_positive, metavar="N", help="answer length of --flash queries"
    )
    watch.add_argument("--data", action="store_true", help="print data updates too")
    watch.add_argument("--count", type=_positive, metavar="N", help="exit after N flash answers")
    watch.add_argument("--json", action="store_true", help="one JSON object a line")
    _transport(watch, "http")
    watch.set_defaults(run=_run("watch"))


def _add_status(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[common], help="where a session stands")
    status.add_argument("--json", action="store_true", help="print the reply as JSON")
    _transport(status, "http")
    status.set_defaults(run=_run("status"))


def _run(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from livelm.client.cli_verbs import run_verb

        return run_verb(verb, args)

    return run


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _choices(text: str) -> list[str]:
    choices = [part.strip() for part in text.split(",")]
    if len(choices) < 2 or not all(choices):
        raise argparse.ArgumentTypeError(f"expected two or more comma-separated labels: {text!r}")
    return choices
