"""The attention kernels as bound keep the next key tile's copies in flight while they compute
a tile (compiled for sm_90 here, no GPU needed). Before their loops carried the next tile's
pages, every copy wait had depth 0 at any ``num_stages``: the KV latency was paid on each tile
and the kernels ran at a third of the H200's MMA rate (perf/NOTES.md, sixth session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_attention_loops_prefetch_the_next_key_tile() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.kernel_depth"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    depths = json.loads(done.stdout)
    for kernel in ("question_prefill", "split_decode"):
        assert max(depths[kernel]) >= 2, (kernel, depths[kernel])  # a tile's K and V in flight
