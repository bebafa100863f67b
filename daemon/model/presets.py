"""Synthetic presets: real model shapes with random weights, for benchmarks and tests.

``random:NAME`` loads the shapes below, fills the weights with seeded random values and uses the
demo tokenizer (its ids are far below every preset's vocabulary size).
"""

from __future__ import annotations

from livelm.daemon.model.config import ModelConfig, RopeScaling
from livelm.protocol.errors import ModelLoadError

PRESET_PREFIX = "random:"

_LLAMA3_EOS = (128001, 128008, 128009)

PRESETS: dict[str, ModelConfig] = {
    "random:llama-3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        bos_token_id=128000,
        eos_token_ids=_LLAMA3_EOS,
    ),
    "random:llama-3.2-1b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        bos_token_id=128000,
        eos_token_ids=_LLAMA3_EOS,
    ),
    "random:qwen2.5-7b": ModelConfig(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
    ),
    # Demo-sized shapes: lets tests and CI exercise the ``random:`` path in well under a second.
    "random:tiny": ModelConfig(
        model_type="llama",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
}


def preset_config(name: str) -> ModelConfig:
    """The preset's config; ``name`` may be given with or without the ``random:`` prefix."""
    key = name if name.startswith(PRESET_PREFIX) else PRESET_PREFIX + name
    config = PRESETS.get(key)
    if config is None:
        raise ModelLoadError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return config
