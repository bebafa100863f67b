"""perf/gemm_overrides.py: a sweep's best skinny GEMM tiles routed in place of the default
rule for A/B runs, plain and SwiGLU-fused tables kept apart, within a row range."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.triton_interpret import import_kernels, interpreter_while_testing

# imported as the other kernel tests import it (interpreted without CUDA): a compiled import
# here, at collection, would leave interpreted kernels calling its compiled helpers
MODULE = "livelm.daemon.kernels.triton_backend.skinny_gemm"
skinny_gemm = import_kernels([MODULE])[MODULE]
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)
PATH = Path(__file__).resolve().parents[1] / "perf" / "gemm_overrides.py"
QKV_1 = (1, 16, 512, 1, 4, 3)  # SkinnyConfig fields, built from the module the tool imports
QKV_16 = (16, 64, 128, 2, 4, 5)
DOWN_1 = (1, 32, 256, 2, 4, 3)


def _config(fields: tuple[int, ...]) -> object:
    return skinny_gemm.SkinnyConfig(*fields[:4], num_warps=fields[4], num_stages=fields[5])


def _module():
    spec = importlib.util.spec_from_file_location("gemm_overrides", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def _results(tmp_path: Path) -> Path:
    def row(gemm: str, n: int, k: int, m: int, fields: tuple[int, ...]) -> dict[str, object]:
        return {"gemm": gemm, "n": n, "k": k, "m": m, "best_config": _config(fields).__dict__}

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"results": [
        row("qkv", 6144, 4096, 16, QKV_16),
        row("qkv", 6144, 4096, 1, QKV_1),
        row("down_swiglu", 4096, 14336, 1, DOWN_1),
    ]}))
    return path


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Puts the kernel module's rules back after the test, whatever install replaced."""
    monkeypatch.setattr(skinny_gemm, "default_config", skinny_gemm.default_config)
    monkeypatch.setattr(skinny_gemm, "swiglu_default_config", skinny_gemm.swiglu_default_config)


def test_tables_keep_plain_and_fused_sweeps_apart(tmp_path: Path) -> None:
    overrides = _module()
    assert overrides.skinny_gemm is skinny_gemm  # the same module, so configs compare equal
    plain = overrides.load_table(_results(tmp_path))
    fused = overrides.load_table(_results(tmp_path), fused=True)
    assert set(plain) == {(6144, 4096)} and set(fused) == {(4096, 14336)}
    assert plain[(6144, 4096)].rows == [1, 16]  # sorted, whatever the file's order
    assert plain[(6144, 4096)].configs == [_config(QKV_1), _config(QKV_16)]
    assert fused[(4096, 14336)].configs == [_config(DOWN_1)]


def test_install_routes_swept_shapes_within_the_row_range(tmp_path: Path, restored: None) -> None:
    overrides = _module()
    rule = skinny_gemm.default_config
    overrides.install(overrides.load_table(_results(tmp_path)), min_rows=1, max_rows=8)
    assert skinny_gemm.default_config(1, 6144, 4096) == _config(QKV_1)
    assert skinny_gemm.default_config(4, 6144, 4096) == _config(QKV_16)  # the next swept M up
    assert skinny_gemm.default_config(16, 6144, 4096) == rule(16, 6144, 4096)  # past max_rows
    assert skinny_gemm.default_config(1, 4096, 4096) == rule(1, 4096, 4096)  # not swept


def test_install_fused_routes_only_the_down_projection_rule(tmp_path: Path, restored: None) -> None:
    overrides = _module()
    plain_rule, fused_rule = skinny_gemm.default_config, skinny_gemm.swiglu_default_config
    table = overrides.load_table(_results(tmp_path), fused=True)
    overrides.install(table, min_rows=1, max_rows=1, fused=True)
    assert skinny_gemm.default_config is plain_rule
    assert skinny_gemm.swiglu_default_config(1, 4096, 14336) == _config(DOWN_1)
    assert skinny_gemm.swiglu_default_config(2, 4096, 14336) == fused_rule(2, 4096, 14336)
    assert skinny_gemm._default_for(True)(1, 4096, 14336) == _config(DOWN_1)  # as looked up
