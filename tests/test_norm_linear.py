"""The ``norm_linear`` operation: a layer's RMS norm (after its residual add) fused into the
skinny GEMM's x tiles, against the float32 reference (``torch_ref.norm_linear``), and the
operation's two Triton forms (fused for decode batches, the norm kernel then linear beyond).

Without CUDA the kernels run in Triton's interpreter (see tests/triton_interpret.py).
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

GEMM = "livelm.daemon.kernels.triton_backend.skinny_gemm"
NORMS = "livelm.daemon.kernels.triton_backend.norms"
OP = "livelm.daemon.kernels.triton_backend.norm_linear"
_modules = import_kernels([GEMM, NORMS, OP])
sg, norms, op = _modules[GEMM], _modules[NORMS], _modules[OP]
Cfg = sg.SkinnyConfig
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)

# the interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest even, which
# biases the rounded sums and products the same way along K
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2 if CUDA else 3e-2}
EPS = 1e-5


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sg, "torch", PoisonedTorch())


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, residual: bool = True, seed: int = 0):
    """x and residual [m, k] of different scales (so the norm's scale matters), a norm weight
    around 1 and a weight [n, k]."""
    g = torch.Generator().manual_seed(seed)

    def make(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g) + shift).to(dtype=dtype, device=DEVICE)

    x = make(m, k, scale=3.0)
    res = make(m, k, scale=0.5) if residual else None
    return x, res, make(k, scale=0.2, shift=1.0), make(n, k, scale=max(k, 1) ** -0.5)


def _check(got: tuple[torch.Tensor, torch.Tensor], x, res, nw, w) -> None:
    out, summed = got
    expected, expected_sum = torch_ref.norm_linear(
        x.float(), None if res is None else res.float(), nw.float(), w.float(), None, EPS
    )
    assert out.shape == expected.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all(), "an output element is not finite (never written?)"
    rel = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert rel < TOL[x.dtype], f"relative error {rel:.2e}"
    if res is None:
        assert summed is x  # the next residual is the input itself
    elif x.dtype == torch.float32 or CUDA:  # the sum is rounded to the dtype, as torch rounds it
        assert torch.equal(summed, res + x)
    else:
        torch.testing.assert_close(summed, res + x, rtol=1e-2, atol=1e-2)


# (M, N, K, config): one row and several, K not a multiple of BLOCK_K (200), N not a multiple
# of BLOCK_N (96), splits that end mid-tile, several M tiles (33 / 16), and the CUDA-core path
CASES = [
    (1, 32, 64, Cfg(16, 32, 64, split_k=1, num_warps=4, num_stages=2)),
    (3, 96, 200, Cfg(16, 64, 32, split_k=3, num_warps=4, num_stages=2)),
    (33, 96, 64, Cfg(16, 32, 16, split_k=4, num_warps=4, num_stages=2)),
    (1, 96, 200, Cfg(1, 32, 64, split_k=1, num_warps=4, num_stages=2)),
    (3, 32, 200, Cfg(4, 32, 64, split_k=2, num_warps=4, num_stages=2)),
]
IDS = [f"M{m}-N{n}-K{k}-bm{c.block_m}-s{c.split_k}" for m, n, k, c in CASES]


@pytest.mark.parametrize("residual", [True, False], ids=["add", "first-layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("m", "n", "k", "config"), CASES, ids=IDS)
def test_matches_the_reference(m: int, n: int, k: int, config: object, dtype: torch.dtype,
                               residual: bool) -> None:
    x, res, nw, w = _inputs(m, n, k, dtype, residual)
    _check(sg.norm_linear(x, res, nw, w, EPS, config), x, res, nw, w)


def test_the_split_cases_really_split_and_fuse_the_norm() -> None:
    plan = sg._plan(3, 96, 200, torch.float32, CASES[1][3], norm=sg.NORM_ADD)
    assert plan.grid == (2, 3, 1) and plan.combine == sg._SEMAPHORE
    assert plan.meta["NORM"] == sg.NORM_ADD and not plan.meta["EVEN_K"]
    assert sg._plan(33, 96, 64, torch.float32, CASES[2][3]).meta["NORM"] == sg.NO_NORM


def test_default_config_strided_rows_and_the_sum_written_once() -> None:
    x, res, nw, w = _inputs(5, 96, 256, torch.float32, seed=1)
    _check(sg.norm_linear(x, res, nw, w, EPS), x, res, nw, w)
    wide = torch.zeros(5, 300, device=DEVICE)
    wide[:, 20:276] = x
    wide_res = torch.zeros(5, 280, device=DEVICE)
    wide_res[:, 7:263] = res
    # row strides 300 and 280, and a norm weight that is a strided view
    strided_nw = torch.stack([nw, nw], dim=1)[:, 0]
    got = sg.norm_linear(wide[:, 20:276], wide_res[:, 7:263], strided_nw, w, EPS, CASES[1][3])
    _check(got, x, res, nw, w)


def test_many_rows_and_the_norm_scale_per_row() -> None:
    """Rows of very different magnitudes: each output row is scaled by its own norm."""
    x, res, nw, w = _inputs(6, 32, 64, torch.float32, seed=2)
    x = x * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.5, 2.0], device=DEVICE)[:, None]
    _check(sg.norm_linear(x, res, nw, w, EPS, CASES[4][3]), x, res, nw, w)


def test_empty_dimensions() -> None:
    x, res, nw, w = _inputs(0, 32, 64, torch.float32)
    out, summed = sg.norm_linear(x, res, nw, w, EPS)
    assert out.shape == (0, 32) and summed.shape == (0, 64)
    x, res, nw, w = _inputs(3, 0, 64, torch.float32)
    out, summed = sg.norm_linear(x, res, nw, w, EPS)
    assert out.shape == (3, 0) and torch.equal(summed, res + x)


def test_bad_inputs_raise_value_error() -> None:
    x, res, nw, w = _inputs(2, 32, 64, torch.float32)
    bad = [
        ((x, res, nw[:10], w), "norm_weight must be \\[K\\]"),
        ((x, res[:1], nw, w), "residual must have x's shape"),
        ((x, res.bfloat16(), nw, w), "residual must match x"),
        ((x, res, nw.double(), w), "norm_weight must match x"),
        ((x[:, :32], res, nw, w), "K=64"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            sg.norm_linear(*args, EPS)
    atomic = Cfg(16, 32, 16, split_k=2, num_warps=4, num_stages=2, combine="atomic")
    with pytest.raises(ValueError, match="semaphore"):
        sg.norm_linear(x, res, nw, w, EPS, atomic)


def test_the_operation_fuses_decode_batches_and_falls_back_beyond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, res, nw, w = _inputs(op.MAX_NORM_FUSED_ROWS + 1, 40, 64, torch.float32, seed=3)
    few, many = slice(0, op.MAX_NORM_FUSED_ROWS), slice(None)

    def fail(*_: object) -> None:
        raise AssertionError("took the wrong path")

    with monkeypatch.context() as patched:  # few rows: the fused kernel, no norm kernel
        patched.setattr(op.norms, "add_rms_norm", fail)
        got = op.fused_norm_linear(x[few], res[few], nw, w, None, EPS)
        _check(got, x[few], res[few], nw, w)
    with monkeypatch.context() as patched:  # more rows, or a bias: the norm kernel, then linear
        patched.setattr(op.skinny_gemm, "norm_linear", fail)
        for rows, bias in ((many, None), (few, torch.randn(40, device=DEVICE))):
            got = op.fused_norm_linear(x[rows], res[rows], nw, w, bias, EPS)
            expected = op.norm_then_linear(x[rows], res[rows], nw, w, bias, EPS)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_the_unfused_form_is_the_norm_kernel_then_linear() -> None:
    x, res, nw, w = _inputs(3, 40, 64, torch.float32, seed=4)
    out, summed = op.norm_then_linear(x, res, nw, w, None, EPS)
    normed, expected_sum = norms.add_rms_norm(x, res, nw, EPS)
    assert torch.equal(summed, expected_sum)
    assert torch.equal(out, sg.linear(normed, w))
    first, same = op.norm_then_linear(x, None, nw, w, None, EPS)
    assert same is x and torch.equal(first, sg.linear(norms.rms_norm(x, nw, EPS), w))


def test_the_dispatcher_checks_both_forms_and_binds_the_preferred_one() -> None:
    from livelm.daemon.kernels.dispatcher import (
        BACKEND_SOURCES,
        ResolveOptions,
        resolve_kernels,
        target_for,
    )
    from livelm.daemon.kernels.ops import OPERATIONS
    from livelm.daemon.kernels.policy import Policy
    from livelm.daemon.model.presets import preset_config

    target = target_for(preset_config("random:tiny"), DEVICE, torch.float32, 16)
    others = {name: ("triton*",) for name in OPERATIONS if name != "norm_linear"}
    sources = tuple(s for s in BACKEND_SOURCES if s[0] in ("torch", "triton"))

    def bind(prefer: dict[str, tuple[str, ...]]):
        return resolve_kernels(target, Policy(deny=others, prefer=prefer),
                               ResolveOptions(sources=sources))

    default = bind({})
    for name in ("triton.norm_linear", "triton.norm_linear_fused"):
        row = next(d for d in default.table if d.candidate == name)
        assert row.status in ("chosen", "passed"), row.reason
    fused = bind({"norm_linear": ("triton.norm_linear_fused",)})
    assert fused.kernels.norm_linear is op.fused_norm_linear
    reference = bind({"norm_linear": ("torch_ref.norm_linear",)})
    assert reference.kernels.norm_linear is torch_ref.norm_linear


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_fused_norm_on_llama_shapes() -> None:
    """Llama-3.1-8B's QKV [6144, 4096] and gate/up [28672, 4096] projections at decode sizes,
    with the default tiles (split K for QKV, so the squares go through the semaphore)."""
    for n in (6144, 28672):
        for m in (1, 4, 16):
            x, res, nw, w = _inputs(m, n, 4096, torch.bfloat16, seed=m)
            _check(sg.norm_linear(x, res, nw, w, EPS), x, res, nw, w)
