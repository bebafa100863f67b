"""Settings flags shared by the ``livelm`` subcommands that build a ``Config``.

Only the settings in ``CONFIG_FLAGS`` have flags (dashes for underscores: ``--block-size`` sets
``block_size``); every setting, these included, can be set in the YAML file (``--config``) or as
a ``LIVELM_<SETTING>`` environment variable (``systemd/livelm.yaml`` lists them all). Only flags
actually given override the environment and the YAML file. Values are passed on as text so that
``load_config`` checks them with the same messages as the other sources. The defaults shown in
``--help`` are read from ``Config``, so they cannot drift from it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from livelm.daemon.config import FIELD_NAMES, FIELDS, MIB, Config, load_config

# flag -> (metavar, help, what the default means or "" when its value says it all); the flag's
# Config field is its name with dashes as underscores, and its default comes from there
CONFIG_FLAGS: dict[str, tuple[str, str, str]] = {
    "--model": ("PATH|random:NAME|demo", "model folder, synthetic preset, or the built-in demo", ""),
    "--host": ("HOST", "address to listen on", ""),
    "--port": ("PORT", "HTTP/WebSocket port", "0 = any free port"),
    "--tcp-port": ("PORT", "framed TCP port", "0 = any free port"),
    "--device": ("DEVICE", "auto, cpu, cuda or cuda:N", ""),
    "--dtype": ("DTYPE", "auto, float32, bfloat16 or float16", ""),
    "--cache-dir": ("DIR", "model cache and kernel timings", "$LIVELM_HOME or ~/.cache/livelm"),
    "--journal-dir": ("DIR", "sessions' entries on disk, restored at start", "empty = off"),
    "--log-level": ("LEVEL", "debug, info, warning, error or critical", ""),
    "--log-format": ("FORMAT", "json or text", ""),
    "--kv-cache-tokens": ("N", "KV pool size in tokens", "0 = from free memory"),
    "--max-batch-tokens": ("N", "token budget of one scheduler step", ""),
    "--block-size": ("N", "tokens per KV block, a power of two up to 256", ""),
    "--max-frame": ("BYTES", "largest TCP frame or WebSocket message", ""),
    "--event-buffer": ("N", "events a session keeps for subscribers that fall behind", ""),
    "--max-flash-queries": ("N", "flash queries per session", "0 = off"),
    "--prefix-cache-conversations": ("N", "completions kept for KV reuse", "0 = off"),
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
        metavar, _, _ = CONFIG_FLAGS[flag]
        parser.add_argument(flag, metavar=metavar, help=flag_help(flag), default=argparse.SUPPRESS)


def flag_help(flag: str) -> str:
    """The flag's help line, ending with its ``Config`` default: ``... (default 64)``."""
    _, text, meaning = CONFIG_FLAGS[flag]
    default = FIELDS[flag[2:].replace("-", "_")].default
    if default == "":
        shown = meaning
    else:
        shown = f"{_shown_default(default)}; {meaning}" if meaning else _shown_default(default)
    # argparse expands % in help texts
    return f"{text} (default {shown})".replace("%", "%%")


def _shown_default(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= MIB and value % MIB == 0:
        return f"{value // MIB} MiB"
    return str(value)


def config_from_args(args: argparse.Namespace) -> Config:
    """Flags given > LIVELM_* environment > --config file > defaults; raises ConfigError."""
    overrides = {name: value for name, value in vars(args).items() if name in FIELD_NAMES}
    return load_config(overrides, args.config, os.environ)
