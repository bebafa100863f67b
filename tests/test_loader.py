"""load_model: folders (single file and sharded), the demo, presets, and load errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from livelm.daemon.kernels.torch_ref import REFERENCE
from livelm.daemon.model.decoder import LlamaDecoder
from livelm.daemon.model.loader import LoadedModel, load_model
from livelm.daemon.progress import Progress
from livelm.protocol.errors import ModelLoadError
from tests.tiny_models import FAMILIES, hf_state_dict, make_tiny_checkpoint

CPU = torch.device("cpu")


def _load(spec: str | Path, cache_dir: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    kernels = REFERENCE
    return load_model(
        str(spec), kernels=kernels, dtype=dtype, device=CPU, cache_dir=cache_dir, progress=False
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        (family, sharded): make_tiny_checkpoint(
            root / f"{family}-{sharded}", family, sharded=sharded
        )
        for family in FAMILIES
        for sharded in (False, True)
    }


def _expected_params(hf: dict[str, torch.Tensor], decoder: LlamaDecoder) -> dict[str, torch.Tensor]:
    """The decoder's parameters as they must be: Hugging Face tensors in its fused layout."""
    expected = {"embed": hf["model.embed_tokens.weight"], "norm": hf["model.norm.weight"]}
    if decoder.lm_head is not None:
        expected["lm_head"] = hf["lm_head.weight"]
    for i in range(len(decoder.layers)):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        attn = [hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
        expected[q + "qkv_weight"] = torch.cat(attn)
        if f"{p}self_attn.q_proj.bias" in hf:
            expected[q + "qkv_bias"] = torch.cat([hf[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
        if f"{p}self_attn.q_norm.weight" in hf:
            expected[q + "q_norm"] = hf[f"{p}self_attn.q_norm.weight"]
            expected[q + "k_norm"] = hf[f"{p}self_attn.k_norm.weight"]
        expected[q + "o_weight"] = hf[f"{p}self_attn.o_proj.weight"]
        expected[q + "gate_up_weight"] = torch.cat(
            [hf[f"{p}mlp.gate_proj.weight"], hf[f"{p}mlp.up_proj.weight"]]
        )
        expected[q + "down_weight"] = hf[f"{p}mlp.down_proj.weight"]
        expected[q + "input_norm"] = hf[f"{p}input_layernorm.weight"]
        expected[q + "post_norm"] = hf[f"{p}post_attention_layernorm.weight"]
    return expected


def _assert_same_weights(folder: Path, model: LoadedModel) -> None:
    expected = _expected_params(hf_state_dict(folder), model.decoder)
    params = dict(model.decoder.named_parameters())
    assert params.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(params[name], tensor.to(params[name].dtype)), name


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_weights_equal_transformers(
    checkpoints: dict[tuple[str, bool], Path], tmp_path: Path, family: str, sharded: bool
) -> None:
    folder = checkpoints[family, sharded]
    if sharded:
        assert len(list(folder.glob("model-*.safetensors"))) >= 2
    _assert_same_weights(folder, _load(folder, tmp_path))


def test_bfloat16(checkpoints: dict[tuple[str, bool], Path], tmp_path: Path) -> None:
    folder = checkpoints["qwen2", True]
    model = _load(folder, tmp_path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.decoder.parameters())
    _assert_same_weights(folder, model)


def test_loaded_model_fields(checkpoints: dict[tuple[str, bool], Path], tmp_path: Path) -> None:
    folder = checkpoints["llama", False]
    model = _load(folder, tmp_path)
    tok = model.tokenizer
    assert model.name == folder.name
    assert model.config.model_type == "llama"
    assert tok.bos_id == tok.token_id("<|begin_of_text|>")
    # generation_config's [end_of_text, eot] joined with the tokenizer's eos (eot)
    assert model.eos_ids == frozenset({tok.token_id("<|end_of_text|>"), tok.token_id("<|eot_id|>")})
    qwen = _load(checkpoints["qwen3", False], tmp_path)
    assert qwen.tokenizer.bos_id is None
    assert qwen.decoder.lm_head is None  # tied embeddings


def test_demo(tmp_path: Path) -> None:
    model = _load("demo", tmp_path)
    assert model.name == "demo"
    assert model.config.vocab_size == model.tokenizer.vocab_size
    # transformers reads the demo folder as an ordinary Llama checkpoint
    _assert_same_weights(next(tmp_path.glob("livelm-demo-*")), model)


def test_tiny_preset(tmp_path: Path) -> None:
    first = _load("random:tiny", tmp_path)
    second = _load("random:tiny", tmp_path)
    assert first.name == "random:tiny"
    assert first.tokenizer.bos_id is not None  # presets use the demo tokenizer
    assert first.eos_ids == frozenset(first.tokenizer.eos_ids)
    for (name, a), b in zip(
        first.decoder.named_parameters(), second.decoder.parameters(), strict=True
    ):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name  # seeded: the same weights every time
    assert first.decoder.embed.std().item() == pytest.approx(0.02, rel=0.05)


def test_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="random:llama-3.1-8b"):
        _load("random:nope", tmp_path)


# ---- errors ----------------------------------------------------------------------------------
@pytest.fixture
def llama_copy(checkpoints: dict[tuple[str, bool], Path], tmp_path: Path) -> Path:
    target = tmp_path / "sharded"
    target.mkdir()
    for path in checkpoints["llama", True].iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nowhere", tmp_path)


def test_missing_config(llama_copy: Path, tmp_path: Path) -> None:
    (llama_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(llama_copy, tmp_path)


def test_missing_weights(llama_copy: Path, tmp_path: Path) -> None:
    (llama_copy / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match="neither model.safetensors nor"):
        _load(llama_copy, tmp_path)


def test_absent_shard(llama_copy: Path, tmp_path: Path) -> None:
    shard = sorted(llama_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"absent: {shard.name}"):
        _load(llama_copy, tmp_path)


def test_truncated_shard(llama_copy: Path, tmp_path: Path) -> None:
    shard = sorted(llama_copy.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"cannot read .*{shard.name}"):
        _load(llama_copy, tmp_path)


def test_garbage_shard(llama_copy: Path, tmp_path: Path) -> None:
    shard = sorted(llama_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match=f"cannot read .*{shard.name}"):
        _load(llama_copy, tmp_path)


def test_corrupt_index(llama_copy: Path, tmp_path: Path) -> None:
    (llama_copy / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="weight_map"):
        _load(llama_copy, tmp_path)


def test_unexpected_tensor(checkpoints: dict[tuple[str, bool], Path], tmp_path: Path) -> None:
    folder = tmp_path / "extra"
    folder.mkdir()
    source = checkpoints["mistral", False]
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.0.mlp.extra.weight"):
        _load(folder, tmp_path)


def test_tokenizer_larger_than_vocab(llama_copy: Path, tmp_path: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["vocab_size"] = 100
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="vocab_size is 100"):
        _load(llama_copy, tmp_path)


# ---- progress --------------------------------------------------------------------------------
def test_progress_while_loading(
    checkpoints: dict[tuple[str, bool], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = checkpoints["qwen3", True]
    kernels = REFERENCE
    load_model(str(folder), kernels=kernels, dtype=torch.float32, device=CPU, cache_dir=tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 4  # a log gets a few plain lines, not one per tensor
    assert lines[-1].startswith(f"loading {folder.name}: 100% (")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line() -> None:
    stream = _Terminal()
    with Progress(3, "warm-up", stream) as bar:
        for _ in range(3):
            bar.update(1)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\r" in text and "100% (3/3)" in text


def test_progress_in_a_log_writes_quarters() -> None:
    stream = io.StringIO()
    with Progress(100, "warm-up", stream) as bar:
        for _ in range(100):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["25%", "50%", "75%", "100%"]
