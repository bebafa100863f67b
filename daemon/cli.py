"""The ``livelm`` command: ``livelm serve [flags]`` (more verbs join ``COMMANDS`` later).

Flags map 1:1 onto ``Config`` fields (dashes to underscores) and only flags actually given
override the environment and the YAML file. Values are passed on as text so that
``load_config`` checks them with the same messages as the other sources.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from livelm.daemon.config import FIELD_NAMES, load_config
from livelm.daemon.kernels.report import add_kernels_parser
from livelm.protocol.errors import ConfigError

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

# flag -> (metavar, help); the flag's Config field is its name with dashes as underscores
SERVE_FLAGS: dict[str, tuple[str, str]] = {
    "--model": ("PATH|random:NAME|demo", "model folder, synthetic preset, or the built-in demo"),
    "--host": ("HOST", "address to listen on (default 127.0.0.1)"),
    "--port": ("PORT", "HTTP/WebSocket port (default 8080; 0 = any free port)"),
    "--tcp-port": ("PORT", "framed TCP port (default 8081)"),
    "--device": ("DEVICE", "auto, cpu, cuda or cuda:N (default auto)"),
    "--dtype": ("DTYPE", "auto, float32, bfloat16 or float16 (default auto)"),
    "--cache-dir": ("DIR", "model cache (default $LIVELM_HOME or ~/.cache/livelm)"),
    "--log-level": ("LEVEL", "debug, info, warning, error or critical (default info)"),
    "--log-format": ("FORMAT", "json or text (default json)"),
    "--kv-cache-tokens": ("N", "KV pool size in tokens (default 0 = from free memory)"),
    "--max-batch-tokens": ("N", "token budget of one scheduler step (default 2048)"),
    "--block-size": ("N", "tokens per KV block, a power of two up to 256 (default 16)"),
}


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
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. Precedence: flags > LIVELM_<SETTING> env > --config > defaults.",
    )
    serve.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=os.environ.get("LIVELM_CONFIG"),
        help="YAML file of settings (default $LIVELM_CONFIG)",
    )
    for flag, (metavar, help_text) in SERVE_FLAGS.items():
        serve.add_argument(flag, metavar=metavar, help=help_text, default=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    overrides = {name: value for name, value in vars(args).items() if name in FIELD_NAMES}
    try:
        config = load_config(overrides, args.config, os.environ)
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
