"""Runs a real Engine in-process on a real checkpoint (used where a test needs the logits)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from livelm.daemon.config import Config
from livelm.daemon.engine.engine import Engine
from livelm.daemon.kernels.startup import bind_kernels
from livelm.daemon.model.loader import LoadedModel, load_model, model_config_for

T = TypeVar("T")
_models: dict[str, LoadedModel] = {}


def loaded(folder: Path, cache_dir: Path, device: str = "cpu") -> LoadedModel:
    key = f"{folder}@{device}"
    if key not in _models:
        config = Config(model=str(folder), device=device, dtype="float32", cache_dir=str(cache_dir))
        kernels = bind_kernels(config, model_config_for(config.model, cache_dir)).kernels
        _models[key] = load_model(
            config.model, kernels=kernels, dtype=torch.float32, device=config.torch_device(),
            cache_dir=cache_dir, progress=False,
        )
    return _models[key]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls ``condition`` on the loop; a test failure (not a hang) if it never holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def run_engine(
    model: LoadedModel, scenario: Callable[[Engine], Awaitable[T]], **overrides: Any
) -> T:
    """Starts an engine on ``model``, runs ``scenario`` against it, and stops it."""
    device = str(model.decoder.device)
    settings = {"device": device, "dtype": "float32", "kv_cache_tokens": 16384, "max_batch_tokens": 64}
    config = Config(**(settings | overrides))

    async def main() -> T:
        engine = Engine(model, config, asyncio.get_running_loop())
        engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.stop(drain_timeout=5.0)

    return asyncio.run(main())
