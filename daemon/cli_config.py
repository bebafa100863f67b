"""Settings flags shared by the ``livelm`` subcommands that build a ``Config``.

Flags map 1:1 onto ``Config`` fields (dashes to underscores); only flags actually given
override the environment and the YAML file. Values are passed on as text so that
``load_config`` checks them with the same messages as the other sources.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from livelm.daemon.config import FIELD_NAMES, Config, load_config

# flag -> (metavar, help); the flag's Config field is its name with dashes as underscores
CONFIG_FLAGS: dict[str, tuple[str, str]] = {
    "--model": ("PATH|random:NAME|demo", "model folder, synthetic preset, or the built-in demo"),
    "--host": ("HOST", "address to listen on (default 127.0.0.1)"),
    "--port": ("PORT", "HTTP/WebSocket port (default 8080; 0 = any free port)"),
    "--tcp-port": ("PORT", "framed TCP port (default 8081)"),
    "--device": ("DEVICE", "auto, cpu, cuda or cuda:N (default auto)"),
    "--dtype": ("DTYPE", "auto, float32, bfloat16 or float16 (default auto)"),
    "--cache-dir": ("DIR", "model cache and kernel timings (default $LIVELM_HOME or ~/.cache/livelm)"),
    "--log-level": ("LEVEL", "debug, info, warning, error or critical (default info)"),
    "--log-format": ("FORMAT", "json or text (default json)"),
    "--kv-cache-tokens": ("N", "KV pool size in tokens (default 0 = from free memory)"),
    "--max-batch-tokens": ("N", "token budget of one scheduler step (default 2048)"),
    "--block-size": ("N", "tokens per KV block, a power of two up to 256 (default 16)"),
    "--max-frame": ("BYTES", "largest TCP frame or WebSocket message (default 16 MiB)"),
    "--event-buffer": ("N", "events a session keeps for subscribers that fall behind (default 1024)"),
    "--max-flash-queries": ("N", "flash queries per session (default 16; 0 = off)"),
    "--prefix-cache-conversations": ("N", "completions kept for KV reuse (default 64; 0 = off)"),
}


def add_config_arguments(parser: argparse.ArgumentParser, flags: Iterable[str] = CONFIG_FLAGS) -> None:
    """``--config FILE.yaml`` and the given settings flags."""
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=os.environ.get("LIVELM_CONFIG"),
        help="YAML file of settings (default $LIVELM_CONFIG)",
    )
    for flag in flags:
        metavar, help_text = CONFIG_FLAGS[flag]
        parser.add_argument(flag, metavar=metavar, help=help_text, default=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Config:
    """Flags given > LIVELM_* environment > --config file > defaults; raises ConfigError."""
    overrides = {name: value for name, value in vars(args).items() if name in FIELD_NAMES}
    return load_config(overrides, args.config, os.environ)
