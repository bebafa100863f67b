"""Builds the model the daemon serves from a spec: a Hugging Face folder, ``random:NAME`` or ``demo``.

Weights stream tensor by tensor from the safetensors shards into the decoder, which is built
directly on the target device, so each weight is allocated once and host memory stays at one
tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from livelm.daemon.kernels.ops import Kernels
from livelm.daemon.model.config import ModelConfig
from livelm.daemon.model.decoder import LlamaDecoder
from livelm.daemon.model.demo import ensure_demo_model
from livelm.daemon.model.presets import PRESET_PREFIX, PRESETS, preset_config
from livelm.daemon.model.tokenizer import Tokenizer
from livelm.daemon.progress import Progress
from livelm.protocol.errors import ModelLoadError

DEMO_SPEC = "demo"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PRESET_SEED = 0


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    decoder: LlamaDecoder
    tokenizer: Tokenizer
    eos_ids: frozenset[int]


def load_model(
    spec: str,
    *,
    kernels: Kernels,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: Path,
    progress: bool = True,
) -> LoadedModel:
    """Load ``spec``: a folder path, ``random:NAME`` (a preset) or ``demo``."""
    if spec == DEMO_SPEC:
        folder = ensure_demo_model(cache_dir)
        return _from_folder(folder, DEMO_SPEC, kernels, dtype, device, progress)
    if spec.startswith(PRESET_PREFIX):
        return _from_preset(spec, kernels, dtype, device, cache_dir)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"model folder {folder} does not exist (a model is a folder path, {DEMO_SPEC!r}, "
            f"or one of {', '.join(PRESETS)})"
        )
    return _from_folder(folder, folder.resolve().name, kernels, dtype, device, progress)


def _from_folder(
    folder: Path,
    name: str,
    kernels: Kernels,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> LoadedModel:
    config = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer.from_folder(folder)
    _check_vocab(config, tokenizer)
    # every file is checked before the decoder takes device memory
    shards = checkpoint_shards(folder)
    total = sum(_count_tensors(shard) for shard in shards)
    decoder = LlamaDecoder(config, kernels, dtype, device)
    with Progress(total, f"loading {name}", enabled=progress) as bar:
        decoder.load_weights(_stream_tensors(shards, bar))
    return _loaded(name, config, decoder, tokenizer)


def _from_preset(
    spec: str, kernels: Kernels, dtype: torch.dtype, device: torch.device, cache_dir: Path
) -> LoadedModel:
    config = preset_config(spec)
    tokenizer = Tokenizer.from_folder(ensure_demo_model(cache_dir))
    _check_vocab(config, tokenizer)
    decoder = LlamaDecoder(config, kernels, dtype, device)
    decoder.init_random(seed=PRESET_SEED)
    return _loaded(spec, config, decoder, tokenizer)


def _loaded(
    name: str, config: ModelConfig, decoder: LlamaDecoder, tokenizer: Tokenizer
) -> LoadedModel:
    eos_ids = frozenset(config.eos_token_ids) | frozenset(tokenizer.eos_ids)
    return LoadedModel(name, config, decoder, tokenizer, eos_ids)


def _check_vocab(config: ModelConfig, tokenizer: Tokenizer) -> None:
    # a token id past the embedding table would fault on the device mid-request
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in load order; raises if any is missing."""
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    index = folder / INDEX_FILE
    if not index.is_file():
        hint = (
            " (.bin checkpoints are not supported)"
            if (folder / "pytorch_model.bin").exists()
            else ""
        )
        raise ModelLoadError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    shards = [folder / name for name in _weight_map_files(index)]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise ModelLoadError(
            f"{INDEX_FILE} in {folder} lists shards that are absent: {', '.join(absent)}"
        )
    return shards


def _weight_map_files(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))  # unique, in order of first mention
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        raise ModelLoadError(f"cannot read the weight_map of {index}: {exc!r}") from exc
    if not files or not all(isinstance(f, str) and "/" not in f for f in files):
        raise ModelLoadError(f"the weight_map of {index} names no usable shard files")
    return files


def _count_tensors(shard: Path) -> int:
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            return len(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read {shard}: {exc}") from exc


def _stream_tensors(shards: list[Path], bar: Progress) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor
                    bar.update(1)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {shard}: {exc}") from exc


def model_config_for(spec: str, cache_dir: Path) -> ModelConfig:
    """The config of ``spec`` (a folder, ``random:NAME`` or ``demo``) without loading weights,
    so kernels can be bound for the model's shapes before its weights are read."""
    if spec == "demo":
        return ModelConfig.from_folder(ensure_demo_model(cache_dir))
    if spec.startswith(PRESET_PREFIX):
        return preset_config(spec)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"model folder {folder} does not exist (a model is a folder path, 'demo', "
            f"or one of {', '.join(PRESETS)})"
        )
    return ModelConfig.from_folder(folder)
