"""The built-in demo model: written once, byte-identical everywhere, loadable."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from livelm.daemon.model.config import ModelConfig
from livelm.daemon.model.demo import DEMO_VERSION, ensure_demo_model
from livelm.daemon.model.tokenizer import Tokenizer


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_written_once(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    hashes = _hashes(first)
    second = ensure_demo_model(tmp_path)
    assert second == first
    assert DEMO_VERSION in first.name
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == stamps
    assert _hashes(second) == hashes
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folder left


def test_identical_when_built_in_another_process(tmp_path: Path) -> None:
    # a fresh interpreter has fresh hash seeds, so this catches any order that depends on them
    here = ensure_demo_model(tmp_path / "a")
    script = (
        "import sys; from pathlib import Path; "
        "from livelm.daemon.model.demo import ensure_demo_model; "
        "print(ensure_demo_model(Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the repository root, whose livelm/ folder holds only part of the package
    )
    there = Path(out.stdout.strip())
    assert there != here
    assert _hashes(there) == _hashes(here)


def test_folder_loads(tmp_path: Path) -> None:
    folder = ensure_demo_model(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer.from_folder(folder)
    assert config.model_type == "llama"
    assert 1000 <= tokenizer.vocab_size <= 2000
    assert config.vocab_size == tokenizer.vocab_size
    assert tokenizer.bos_id == tokenizer.token_id("<|begin_of_text|>")
    assert tokenizer.eos_ids == (tokenizer.token_id("<|eot_id|>"),)
    assert set(config.eos_token_ids) == {
        tokenizer.token_id("<|end_of_text|>"),
        tokenizer.token_id("<|eot_id|>"),
    }
    line = "2024-03-04 09:31 AAPL o=182.15 c=182.44 v=120340"
    assert tokenizer.decode(tokenizer.encode(line)) == line
    prefix, suffix = tokenizer.chat_split("You watch a market feed.")
    assert prefix.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert suffix == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_weights_have_hugging_face_names_and_shapes(tmp_path: Path) -> None:
    folder = ensure_demo_model(tmp_path)
    config = ModelConfig.from_folder(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    h, v = config.hidden_size, config.vocab_size
    assert shapes["model.embed_tokens.weight"] == (v, h)
    assert shapes["lm_head.weight"] == (v, h)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (config.kv_size, h)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (h, config.intermediate_size)
    assert len(shapes) == 3 + 9 * config.num_layers
