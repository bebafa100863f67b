"""ModelConfig read from checkpoints that transformers saved, the presets, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livelm.daemon.model.config import ModelConfig, RopeScaling
from livelm.daemon.model.presets import PRESETS, preset_config
from livelm.protocol.errors import ModelLoadError
from tests.tiny_models import FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    return {family: make_tiny_checkpoint(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_match_transformers(checkpoints: dict[str, Path], family: str) -> None:
    import transformers

    folder = checkpoints[family]
    hf = transformers.AutoConfig.from_pretrained(folder)
    config = ModelConfig.from_folder(folder)
    assert config.model_type == family
    assert config.vocab_size == hf.vocab_size
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.head_dim == hf.head_dim == 16
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings == hf.tie_word_embeddings


@pytest.mark.parametrize(
    ("family", "bias", "qk_norm", "window", "scaling"),
    [
        ("llama", False, False, None, RopeScaling(8.0, 1.0, 4.0, 64)),
        ("mistral", False, False, 4096, None),
        ("qwen2", True, False, None, None),
        ("qwen3", False, True, None, None),
    ],
)
def test_family_switches(
    checkpoints: dict[str, Path],
    family: str,
    bias: bool,
    qk_norm: bool,
    window: int | None,
    scaling: RopeScaling | None,
) -> None:
    config = ModelConfig.from_folder(checkpoints[family])
    assert config.attention_bias is bias
    assert config.qk_norm is qk_norm
    assert config.sliding_window == window
    assert config.rope_scaling == scaling


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_ids_come_from_generation_config(checkpoints: dict[str, Path], family: str) -> None:
    folder = checkpoints[family]
    generation = json.loads((folder / "generation_config.json").read_text())
    config = ModelConfig.from_folder(folder)
    assert config.eos_token_ids == tuple(generation["eos_token_id"])
    assert len(config.eos_token_ids) == 2


def test_transformers_4_style_rope_fields() -> None:
    raw = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "eos_token_id": [128001, 128008, 128009],
    }
    config = ModelConfig.from_hf_dict(raw)
    assert config.head_dim == 128
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert config.eos_token_ids == (128001, 128008, 128009)


def _parameter_count(c: ModelConfig) -> int:
    qkv = c.q_size + 2 * c.kv_size
    layer = c.hidden_size * qkv + c.q_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    layer += (
        2 * c.hidden_size + (qkv if c.attention_bias else 0) + (2 * c.head_dim if c.qk_norm else 0)
    )
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_layers * layer + c.hidden_size


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # the published parameter counts of the real models
        ("random:llama-3.1-8b", 8_030_261_248),
        ("random:llama-3.2-1b", 1_235_814_400),
        ("random:qwen2.5-7b", 7_615_616_512),
    ],
)
def test_presets_have_the_real_shapes(name: str, params: int) -> None:
    assert _parameter_count(PRESETS[name]) == params


def test_preset_details() -> None:
    llama8b = preset_config("random:llama-3.1-8b")
    assert llama8b.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert llama8b.eos_token_ids == (128001, 128008, 128009)
    assert llama8b.bos_token_id == 128000
    assert llama8b.max_position_embeddings == 131072
    llama1b = preset_config("llama-3.2-1b")  # the prefix is optional
    assert llama1b.tie_word_embeddings and llama1b.head_dim == 64
    assert llama1b.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    qwen = preset_config("random:qwen2.5-7b")
    assert qwen.attention_bias and not qwen.tie_word_embeddings
    assert (qwen.rope_theta, qwen.rms_norm_eps, qwen.max_position_embeddings) == (1e6, 1e-6, 32768)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ModelLoadError) as err:
        preset_config("random:gpt-5")
    for name in PRESETS:
        assert name in str(err.value)


def _edited_config(folder: Path, tmp_path: Path, **changes: object) -> Path:
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_unsupported_model_type(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited_config(checkpoints["llama"], tmp_path, model_type="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_folder(folder)


def test_missing_field(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited_config(checkpoints["qwen2"], tmp_path, hidden_size=None)
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_folder(folder)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        ModelConfig.from_folder(tmp_path)
