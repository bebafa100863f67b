"""Importing our Triton kernels in tests: compiled on a CUDA machine, and on one without CUDA
run by Triton's interpreter, which must be on (TRITON_INTERPRET=1) when a kernel is decorated.
So the modules are imported, or re-imported, with it set, and it stays set only while the
tests of the module that asked for it run."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import types
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@contextlib.contextmanager
def interpret_env(on: bool) -> Iterator[None]:
    before = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


SHARED_JIT_MODULES = ("livelm.daemon.kernels.triton_backend.pdl",)  # jit helpers kernels call


def import_kernels(names: list[str]) -> dict[str, types.ModuleType]:
    """The modules by dotted name, in dependency order; the first must offer
    ``is_interpreted()``. Without CUDA, ones imported compiled earlier are re-imported, after
    the shared jit helpers they call (an interpreted kernel cannot call a compiled helper)."""
    with interpret_env(not CUDA):
        pytest.importorskip("triton")
        mods = {name: importlib.import_module(name) for name in names}
        if not CUDA and not mods[names[0]].is_interpreted():
            for shared in SHARED_JIT_MODULES:
                importlib.reload(importlib.import_module(shared))
            for name in names:
                mods[name] = importlib.reload(mods[name])
    return mods


def interpreter_while_testing() -> Iterator[None]:
    """Use as a module's autouse fixture: ``pytest.fixture(autouse=True, scope="module")``."""
    with interpret_env(not CUDA):
        yield


class PoisonedTorch(types.ModuleType):
    """torch, except that fresh tensors come filled with NaN (or a huge int) to catch gaps."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    @staticmethod
    def _poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan if t.is_floating_point() else 2**30)

    def empty(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self._poison(torch.empty_like(*args, **kwargs))
