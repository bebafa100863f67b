"""Binding kernels for a model at startup: the one call the daemon, benchmarks and tests use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from livelm.daemon.kernels.dispatcher import Binding, ResolveOptions, resolve_kernels, target_for
from livelm.daemon.kernels.policy import load_policy
from livelm.daemon.model.config import ModelConfig
from livelm.daemon.model.loader import LoadedModel, load_model, model_config_for

if TYPE_CHECKING:
    from livelm.daemon.config import Config


def bind_and_load(config: Config, *, progress: bool = True) -> tuple[Binding, LoadedModel]:
    """Binds the kernels for ``config.model``, then loads it with them on the configured
    device and dtype (the daemon's start-up; the benchmarks load the same way)."""
    binding = bind_kernels(config, model_config_for(config.model, config.cache_path()))
    model = load_model(
        config.model,
        kernels=binding.kernels,
        dtype=config.torch_dtype(),
        device=config.torch_device(),
        cache_dir=config.cache_path(),
        progress=progress,
    )
    return binding, model


def bind_kernels(config: Config, model_config: ModelConfig) -> Binding:
    """Resolve one kernel per operation for this model, device and dtype under the config's
    policy; a locked kernel that is refused raises a KernelResolutionError (a ConfigError)."""
    target = target_for(model_config, config.torch_device(), config.torch_dtype(), config.block_size)
    policy = load_policy(config.kernel_policy) if config.kernel_policy else None
    options = ResolveOptions(
        tune=config.kernel_tune,
        cache_dir=config.cache_path(),
        ffn_size=model_config.intermediate_size,
    )
    return resolve_kernels(target, policy, options)
