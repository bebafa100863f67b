"""The benchmark of record, run where it cannot measure (``make bench`` on a CPU machine),
says why in one line instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on this machine's GPU instead")
def test_stream_bench_without_cuda_says_so() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "perf" / "stream_bench.py")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr and "Traceback" not in done.stderr
