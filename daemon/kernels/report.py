"""``livelm kernels``: resolve the kernels for a model's shapes and print the decision table.

Only the model's config is read (no weights), so the command is quick on any model. It takes
the same settings as ``livelm serve`` (flags > LIVELM_* environment > --config file), with
``--policy`` and ``--tune`` for the ``kernel_policy`` and ``kernel_tune`` settings, and binds
through the same ``bind_kernels`` as the daemon, so the table is what ``serve`` would bind.
Exit codes: 0; 2 for a configuration error or a kernel the policy requires that cannot be
bound; 3 when the model's config cannot be read.

This module imports torch only when the command runs, so registering it costs ``--help`` nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from livelm.daemon.cli_config import add_config_arguments, config_from_args

if TYPE_CHECKING:
    from livelm.daemon.kernels.candidates import Target
    from livelm.daemon.kernels.dispatcher import Decision

EXIT_OK, EXIT_CONFIG, EXIT_MODEL = 0, 2, 3

KERNEL_FLAGS = ("--model", "--device", "--dtype", "--block-size", "--cache-dir")


def add_kernels_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "kernels",
        help="show which kernel each operation would use, and why",
        description="Resolve the kernels for a model's shapes on this machine and print the table.",
    )
    add_config_arguments(parser, KERNEL_FLAGS)
    parser.add_argument(
        "--policy",
        "--kernel-policy",
        dest="kernel_policy",
        metavar="FILE.yaml",
        default=argparse.SUPPRESS,
        help="kernel policy: lock, allow, deny, prefer (default: the kernel_policy setting)",
    )
    parser.add_argument(
        "--tune",
        "--kernel-tune",
        dest="kernel_tune",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="time the candidates on the model's shapes (CUDA only; cached in the cache dir)",
    )
    parser.set_defaults(run=kernels_main)


def kernels_main(args: argparse.Namespace) -> int:
    from livelm.daemon.kernels.startup import bind_kernels
    from livelm.daemon.model.loader import model_config_for
    from livelm.protocol.errors import ConfigError, ModelLoadError

    try:
        config = config_from_args(args)
        binding = bind_kernels(config, model_config_for(config.model, config.cache_path()))
    except ModelLoadError as exc:
        print(f"livelm kernels: cannot read the model's config: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except ConfigError as exc:
        table = getattr(exc, "table", ())
        if table:
            print(format_table(table))
        print(f"livelm kernels: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if binding.target is not None:
        print(describe_target(binding.target))
    print(f"policy: {config.kernel_policy or 'built-in default (no policy file)'}\n")
    print(format_table(binding.table))
    return EXIT_OK


def describe_target(t: Target) -> str:
    where = str(t.device)
    if t.device.type == "cuda":
        from torch.cuda import get_device_name

        where += f" ({get_device_name(t.device)}, sm{t.capability[0]}{t.capability[1]})"
    window = t.sliding_window if t.sliding_window is not None else "none"
    return (
        f"target: {where}, {str(t.dtype).removeprefix('torch.')}; heads {t.num_heads} q / "
        f"{t.num_kv_heads} kv x {t.head_dim}, hidden {t.hidden_size}, vocab {t.vocab_size}, "
        f"block size {t.block_size}, sliding window {window}"
    )


def format_table(table: Sequence[Decision]) -> str:
    """Columns: operation, candidate, backend, status, time (only when tuned), reason."""
    timed = any(d.time_ms is not None for d in table)
    header = ["operation", "candidate", "backend", "status"] + (["time"] if timed else []) + ["reason"]
    rows = [header]
    for d in table:
        row = [d.operation, d.candidate, d.backend, d.status]
        if timed:
            row.append("" if d.time_ms is None else f"{d.time_ms:.4f} ms")
        rows.append([*row, d.reason])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)

