"""Sweep-chosen skinny GEMM configs in place of the kernel's default rule, for A/B runs of
``step_profile.py`` (a benchmark tool: the daemon keeps ``skinny_gemm.default_config``).

The table comes from a ``skinny_gemm_bench.py`` results file: each projection shape (N, K)
and swept row count M has a best config. A call with M rows takes the config swept at the
smallest M at or above it (beyond the largest, the largest's), for row counts from
``min_rows`` to ``max_rows``; other calls and unswept shapes keep the default rule.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from livelm.daemon.kernels.triton_backend import skinny_gemm
from livelm.daemon.kernels.triton_backend.skinny_gemm import SkinnyConfig


@dataclass(frozen=True)
class SweptShape:
    rows: list[int]  # swept row counts, ascending
    configs: list[SkinnyConfig]  # the best config at each

    def pick(self, m: int) -> SkinnyConfig:
        at = min(bisect.bisect_left(self.rows, m), len(self.rows) - 1)
        return self.configs[at]


def load_table(path: Path, fused: bool = False) -> dict[tuple[int, int], SweptShape]:
    """The plain projections' table, or (``fused``) the SwiGLU-fused down projection's."""
    by_shape: dict[tuple[int, int], list[tuple[int, SkinnyConfig]]] = {}
    for result in json.loads(path.read_text())["results"]:
        if result["gemm"].endswith("_swiglu") != fused:
            continue
        config = SkinnyConfig(**result["best_config"])
        by_shape.setdefault((result["n"], result["k"]), []).append((result["m"], config))
    table = {}
    for shape, entries in by_shape.items():
        entries.sort(key=lambda entry: entry[0])
        table[shape] = SweptShape([m for m, _ in entries], [c for _, c in entries])
    return table


def install(table: dict[tuple[int, int], SweptShape], min_rows: int = 1,
            max_rows: int | None = None, fused: bool = False) -> None:
    """Routes ``skinny_gemm.default_config`` (``fused``: ``swiglu_default_config``) through
    the table (process-wide)."""
    name = "swiglu_default_config" if fused else "default_config"
    rule = getattr(skinny_gemm, name)

    def swept_or_default(m: int, n: int, k: int, *args: object, **kwargs: object) -> SkinnyConfig:
        swept = table.get((n, k))
        if swept is None or m < min_rows or (max_rows is not None and m > max_rows):
            return rule(m, n, k, *args, **kwargs)
        return swept.pick(m)

    setattr(skinny_gemm, name, swept_or_default)
