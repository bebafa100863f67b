"""The ``livelm`` command: ``serve`` and ``kernels`` (settings flags: cli_config), and the client
verbs ``push``, ``query``, ``watch``, ``status`` (livelm.client.cli_parsers)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from livelm.client.cli_parsers import add_client_parsers
from livelm.daemon.cli_config import add_config_arguments, config_from_args
from livelm.daemon.kernels.report import add_kernels_parser
from livelm.protocol.errors import ConfigError

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        return command(args)
    except KeyboardInterrupt:  # Ctrl-C before the server's own signal handling is in place
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livelm", description="LiveLM: a stateful LLM inference daemon for streaming data."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_serve(commands)
    add_kernels_parser(commands)
    add_client_parsers(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. Precedence: flags > LIVELM_<SETTING> env > --config > defaults.",
    )
    add_config_arguments(serve)
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"livelm: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # imported here so that --help and config errors do not pay for torch and the engine
    from livelm.daemon.app import run

    return run(config)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("livelm")
    except PackageNotFoundError:
        return "unknown"
