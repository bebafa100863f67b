"""Programmatic dependent launch (PDL) for our Triton kernels, on Hopper and newer GPUs.

A decode step is ~320 small kernels back to back; without PDL each one is launched only once
its predecessor has fully drained, which leaves the GPU idle for a microsecond or two at every
boundary. Launched with PDL, a kernel's programs may be scheduled while the previous kernel is
still finishing; they block in ``wait_for_producer`` until that kernel has completed and its
writes are visible, and only then read their inputs or write anything.

Safety rests on two rules every kernel here follows: it calls ``wait_for_producer`` before its
first load of data another kernel writes and before its first store; and it signals its own
dependents only after that wait, so at most one kernel runs ahead. Since each kernel cannot
finish before its predecessor has, completion of the previous kernel implies completion of
every earlier one, as in plain stream order. Kernels launched without PDL (cuBLAS, torch) keep
plain stream order on both sides.

``launch_args`` gives the compile-time flag and launch option for a device: PDL needs compute
capability 9.0+, a Triton that knows the ``launch_pdl`` option, and a real GPU (never the
interpreter). ``set_enabled(False)`` turns it off process-wide, for A/B benchmarks;
``suspended()`` for the launches (or graph captures) inside it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

_OFF: dict[str, object] = {"USE_PDL": False}
_ON: dict[str, object] = {"USE_PDL": True, "launch_pdl": True}
_enabled = True


@triton.jit
def wait_for_producer(USE_PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed, then let the next start."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def is_interpreted() -> bool:
    return not isinstance(wait_for_producer, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=1)
def triton_supports_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and hasattr(tl.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=16)
def device_supports_pdl(device: torch.device) -> bool:
    if device.type != "cuda" or is_interpreted():
        return False  # the CPU, or Triton's interpreter
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0) and triton_supports_pdl()


def launch_args(device: torch.device) -> dict[str, object]:
    """``USE_PDL`` (a kernel constexpr) and, when on, the ``launch_pdl`` launch option."""
    return _ON if _enabled and device_supports_pdl(device) else _OFF


def set_enabled(enabled: bool) -> None:
    """Process-wide switch for benchmarks; kernels compiled for both settings may coexist."""
    global _enabled
    _enabled = enabled


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Kernels launched inside go without PDL; a CUDA graph captured inside keeps that. The
    switch is process-wide while inside: for start-up work (graph capture), while no other
    thread launches kernels."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def enabled_on(device: torch.device) -> bool:
    return launch_args(device) is _ON
