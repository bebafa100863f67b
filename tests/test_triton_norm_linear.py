"""The residual add + RMSNorm folded into the skinny GEMM (one row) against the reference
``F.linear(rms_norm(x + residual) , w)``, and the dispatcher operation that falls back to the
norm kernel then ``linear`` for anything it does not fuse.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (see
tests/triton_interpret.py); with CUDA the same cases run compiled, plus Llama-3.1-8B's shapes.
"""

from __future__ import annotations

import pytest
import torch

from livelm.daemon.kernels import torch_ref
from tests.triton_interpret import (
    CUDA,
    DEVICE,
    PoisonedTorch,
    import_kernels,
    interpreter_while_testing,
)

SKINNY = "livelm.daemon.kernels.triton_backend.skinny_gemm"
NORMS = "livelm.daemon.kernels.triton_backend.norms"
MODULE = "livelm.daemon.kernels.triton_backend.norm_linear"
_modules = import_kernels([SKINNY, NORMS, MODULE])
sg, nm, nl = _modules[SKINNY], _modules[NORMS], _modules[MODULE]
Cfg = sg.SkinnyConfig
EPS = 1e-5
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nl, "torch", PoisonedTorch())
    monkeypatch.setattr(sg, "torch", PoisonedTorch())


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(rows: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)

    x, res = randn(rows, k), randn(rows, k, scale=3.0)
    gamma = randn(k, scale=0.5) + 1.0
    w = randn(n, k, scale=k**-0.5)
    return x, res, gamma, w


def _check(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, res: torch.Tensor,
           gamma: torch.Tensor, w: torch.Tensor) -> None:
    out, summed = got
    ref_out, ref_summed = torch_ref.add_rms_norm_linear(
        x.float(), res.float(), gamma.float(), EPS, w.float())
    assert out.shape == ref_out.shape and out.dtype == x.dtype
    # the residual sum is the norm kernel's to the bit (added in fp32, rounded once; the
    # interpreter rounds bf16 toward zero, as both kernels then do)
    assert torch.equal(summed, nm.add_rms_norm(x, res, gamma, EPS)[1])
    assert torch.isfinite(out).all(), "an output element is not finite (never written?)"
    rel = ((out.double() - ref_out.double()).norm() / ref_out.double().norm()).item()
    assert rel < TOL[x.dtype], f"relative error {rel:.2e}"
    assert torch.allclose(summed.float(), ref_summed, rtol=1e-2 if x.dtype != torch.float32 else 0)


# (N, K, config): both product paths, a plain store, split-K merged by semaphore or atomics,
# K not a whole number of BLOCK_K steps (200) and N not of BLOCK_N (96 by 64)
CASES = [
    (32, 64, Cfg(16, 32, 64, split_k=1, num_warps=4, num_stages=2)),
    (96, 200, Cfg(16, 64, 32, split_k=3, num_warps=4, num_stages=2, combine="semaphore")),
    (96, 200, Cfg(16, 64, 32, split_k=3, num_warps=4, num_stages=2, combine="atomic")),
    (96, 200, Cfg(1, 32, 64, split_k=1, num_warps=4, num_stages=2)),
    (40, 256, Cfg(1, 16, 32, split_k=4, num_warps=4, num_stages=3, combine="semaphore")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("n", "k", "config"), CASES,
    ids=[f"N{n}-K{k}-bm{c.block_m}-s{c.split_k}-{c.combine}" for n, k, c in CASES],
)
def test_fused_matches_reference(n: int, k: int, config: object, dtype: torch.dtype) -> None:
    x, res, gamma, w = _inputs(1, n, k, dtype)
    _check(nl.add_rms_norm_linear(x, res, gamma, EPS, w, config), x, res, gamma, w)


def test_fused_cases_really_split_and_norm() -> None:
    plan = sg._plan(1, 96, 200, torch.float32, CASES[1][2], norm=True)
    assert plan.grid == (2, 3, 1) and plan.combine == sg._SEMAPHORE
    assert plan.meta["NORM"] and plan.meta["NORM_BLOCK"] == 256 and not plan.meta["EVEN_K"]
    assert not sg._plan(1, 96, 200, torch.float32, CASES[1][2]).meta["NORM"]


def test_fused_default_config_and_the_unfused_path_agree() -> None:
    x, res, gamma, w = _inputs(1, 96, 256, torch.float32, seed=2)
    out, summed = nl.add_rms_norm_linear(x, res, gamma, EPS, w)
    normed, ref_summed = nm.add_rms_norm(x, res, gamma, EPS)
    assert torch.equal(summed, ref_summed)
    assert torch.allclose(out, sg.skinny_linear(normed, w), rtol=1e-5, atol=1e-6)


def test_op_fuses_one_row_and_falls_back_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object, **__: object) -> None:
        raise AssertionError("took the wrong path")

    x, res, gamma, w = _inputs(3, 40, 64, torch.float32, seed=3)
    one = (x[:1], res[:1], gamma)
    with monkeypatch.context() as patched:  # one row: the fused kernel alone
        patched.setattr(nl.norms, "add_rms_norm", fail)
        fused = nl.add_rms_norm_linear_op(*one, EPS, w)
    _check(fused, x[:1], res[:1], gamma, w)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with monkeypatch.context() as patched:  # several rows, or a bias: unfused
        patched.setattr(nl, "add_rms_norm_linear", fail)
        out, summed = nl.add_rms_norm_linear_op(x, res, gamma, EPS, w)
        normed, ref_summed = nm.add_rms_norm(x, res, gamma, EPS)
        assert torch.equal(summed, ref_summed) and torch.equal(out, sg.linear(normed, w))
        out, summed = nl.add_rms_norm_linear_op(*one, EPS, w, bias)
        ref = torch_ref.add_rms_norm_linear(*one, EPS, w, bias)
        assert torch.allclose(out, ref[0], rtol=1e-5, atol=1e-6) and torch.equal(summed, ref[1])


def test_bad_inputs_raise_value_error() -> None:
    x, res, gamma, w = _inputs(2, 32, 64, torch.float32)
    bad = [
        ((x, res, gamma, EPS, w), "one row"),
        ((x[:1], res[:1, :32], gamma, EPS, w), "one row"),
        ((x[:1], res[:1], gamma[:32], EPS, w), "norm_weight"),
        ((x[:1], res[:1].double(), gamma, EPS, w), "dtype"),
        ((x[:1], res[:1], gamma, EPS, w[:, :32]), "columns"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            nl.add_rms_norm_linear(*args)
    wide = torch.zeros(1, nl.MAX_NORM_K + 1, device=DEVICE)
    with pytest.raises(ValueError, match="wider"):
        nl.add_rms_norm_linear(wide, wide, wide[0], EPS, wide)


def test_dispatcher_checks_and_binds_the_fused_norm() -> None:
    from tests.test_triton_skinny_gemm import _binder

    bind = _binder("add_rms_norm_linear")
    default = bind({})
    row = next(d for d in default.table if d.candidate == "triton.add_rms_norm_linear")
    assert row.status == "passed", row.reason
    preferred = bind({"add_rms_norm_linear": ("triton.add_rms_norm_linear",)})
    assert preferred.kernels.add_rms_norm_linear is nl.add_rms_norm_linear_op
    torch_first = bind({"add_rms_norm_linear": ("torch_ref.add_rms_norm_linear",)})
    assert torch_first.kernels.add_rms_norm_linear is torch_ref.add_rms_norm_linear


@needs_cuda
@pytest.mark.gpu
def test_gpu_llama_shapes_and_graph_replay() -> None:
    """Llama-3.1-8B's qkv (6144) and gate/up (28672) projections of a 4096-wide row, then one
    captured call replayed on new inputs."""
    for n in (6144, 28672):
        x, res, gamma, w = _inputs(1, n, 4096, torch.bfloat16, seed=n)
        _check(nl.add_rms_norm_linear(x, res, gamma, EPS, w), x, res, gamma, w)
    x, res, gamma, w = _inputs(1, 6144, 4096, torch.bfloat16, seed=7)
    nl.add_rms_norm_linear(x, res, gamma, EPS, w)  # compiles, and sizes the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, summed = nl.add_rms_norm_linear(x, res, gamma, EPS, w)
    fresh = _inputs(1, 6144, 4096, torch.bfloat16, seed=8)
    x.copy_(fresh[0])
    res.copy_(fresh[1])
    graph.replay()
    torch.cuda.synchronize()
    _check((out, summed), x, res, gamma, w)
