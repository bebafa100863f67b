"""What a perf result records about its run: the commit measured and the GPU."""

from __future__ import annotations

import os
import subprocess

import torch


def commit() -> str:
    """LIVELM_COMMIT when set (the device's copy of the checkout may report an older HEAD),
    else git's HEAD, else "unknown"."""
    if os.environ.get("LIVELM_COMMIT"):
        return os.environ["LIVELM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cuda_missing(script: str) -> str | None:
    """Why ``script`` cannot measure here (it times the GPU path against a GPU's floor), or
    None when a CUDA device is present."""
    if torch.cuda.is_available():
        return None
    return (f"{script} measures the GPU path and needs a CUDA device; none is visible here "
            "(run it on the GPU machine: perf/gpu_session.sh)")


def meta() -> dict[str, str]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"commit": commit(), "gpu": gpu, "torch": torch.__version__}
