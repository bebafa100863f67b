"""The decoder's configuration, read from a Hugging Face ``config.json`` (or built by a preset)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livelm.protocol.errors import ModelLoadError

# model_type -> family switches that differ from plain Llama
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type: llama3``); ``None`` means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        """Build from the dict of ``config.json`` (and ``generation_config.json`` for eos ids)."""
        model_type = raw.get("model_type")
        if model_type not in _FAMILIES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            family = _FAMILIES[model_type]
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(raw)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", family.get("attention_bias", False))),
                qk_norm=bool(family.get("qk_norm", False)),
                sliding_window=_sliding_window(raw),
                rope_scaling=_rope_scaling(raw),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_eos_ids(raw, generation or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no config.json")
        generation_path = folder / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls.from_hf_dict(json.loads(path.read_text()), generation)


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes ``rope_parameters``; older files write rope_theta / rope_scaling
    params = raw.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def _rope_theta(raw: dict[str, Any]) -> float:
    return _rope_params(raw).get("rope_theta", raw.get("rope_theta", 10000.0))


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    scaling = raw.get("rope_scaling") or _rope_params(raw)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: llama3)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    if raw.get("model_type") in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    value = generation.get("eos_token_id", raw.get("eos_token_id"))
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))
