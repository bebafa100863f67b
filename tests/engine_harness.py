"""Runs a real Engine in-process on a real checkpoint (used where a test needs the logits)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from livelm.daemon.config import Config
from livelm.daemon.engine.engine import Engine
from livelm.daemon.kernels.dispatcher import resolve_kernels
from livelm.daemon.model.loader import LoadedModel, load_model

T = TypeVar("T")
_models: dict[str, LoadedModel] = {}


def loaded(folder: Path, cache_dir: Path) -> LoadedModel:
    key = str(folder)
    if key not in _models:
        device = torch.device("cpu")
        kernels = resolve_kernels(device, torch.float32).kernels
        _models[key] = load_model(
            key, kernels=kernels, dtype=torch.float32, device=device, cache_dir=cache_dir, progress=False
        )
    return _models[key]


def run_engine(
    model: LoadedModel, scenario: Callable[[Engine], Awaitable[T]], **overrides: Any
) -> T:
    """Starts an engine on ``model``, runs ``scenario`` against it, and stops it."""
    settings = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 16384, "max_batch_tokens": 64}
    config = Config(**(settings | overrides))

    async def main() -> T:
        engine = Engine(model, config, asyncio.get_running_loop())
        engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.stop(drain_timeout=5.0)

    return asyncio.run(main())
