"""The skinny Triton GEMM against ``x.float() @ w.float().T``, and its SwiGLU-fused variant
against ``swiglu(gate_up).float() @ w.float().T``.

Without CUDA the kernel runs on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 must be
set when the kernel is decorated, so this module imports (or re-imports) it with it set, and
keeps it set only while its own tests run (as tests/test_triton_kernels.py does). With CUDA the
same small cases run compiled.
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

MODULE = "livelm.daemon.kernels.triton_backend.skinny_gemm"
SWIGLU = "livelm.daemon.kernels.triton_backend.swiglu"  # the unfused path of swiglu_linear
_modules = import_kernels([MODULE, SWIGLU])
sg, sw = _modules[MODULE], _modules[SWIGLU]
Cfg = sg.SkinnyConfig
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sg, "torch", PoisonedTorch())


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=DEVICE)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype=dtype, device=DEVICE)
    return x, w


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tol: float | None = None) -> None:
    ref = x.float() @ w.float().T
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all(), "an output element is not finite (never written?)"
    rel = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert rel < (tol or TOL[x.dtype]), f"relative error {rel:.2e}"


# (M, N, K, config): K not a multiple of BLOCK_K (200), N not a multiple of BLOCK_N (96 / 64),
# several M tiles (33 / 16), and splits that end mid-tile (K=200 in 3 splits of 96)
SPLIT1 = Cfg(16, 32, 64, split_k=1, num_warps=4, num_stages=2)
CASES = [
    (m, n, k, Cfg(16, bn, bk, split_k=split, num_warps=4, num_stages=2, combine=combine))
    for m, n, k in [(1, 32, 64), (3, 96, 200), (16, 32, 200), (33, 96, 64)]
    for bn, bk, split, combine in [
        (32, 64, 1, "semaphore"),  # split_k=1: a plain store, whatever the combine
        (64, 32, 3, "atomic"),
        (64, 32, 3, "semaphore"),
        (32, 16, 4, "semaphore"),
    ]
] + [  # the CUDA-core path: block_m below 16, one or two M tiles
    (1, 96, 200, Cfg(1, 32, 64, split_k=1, num_warps=4, num_stages=2)),
    (1, 32, 64, Cfg(1, 16, 16, split_k=3, num_warps=4, num_stages=2, combine="semaphore")),
    (3, 96, 200, Cfg(2, 64, 32, split_k=3, num_warps=4, num_stages=2, combine="atomic")),
    (3, 32, 200, Cfg(4, 32, 64, split_k=2, num_warps=4, num_stages=2, combine="semaphore")),
]


def _case_ids(cases: list) -> list[str]:
    return [f"M{m}-N{n}-K{k}-bm{c.block_m}-bn{c.block_n}-bk{c.block_k}-s{c.split_k}-{c.combine}"
            for m, n, k, c in cases]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("m", "n", "k", "config"), CASES,
    ids=_case_ids(CASES),
)
def test_matches_reference(m: int, n: int, k: int, config: object, dtype: torch.dtype) -> None:
    x, w = _inputs(m, n, k, dtype)
    _check(sg.skinny_linear(x, w, config), x, w)


def test_split_cases_really_split() -> None:
    """The split-K cases above launch more than one split, and end mid-tile where meant to."""
    plan = sg._plan(3, 96, 200, torch.float32, CASES[2][3])
    assert plan.grid == (2, 3, 1) and plan.combine == sg._SEMAPHORE
    assert not plan.meta["EVEN_K"]
    assert sg._plan(1, 32, 64, torch.float32, CASES[3][3]).grid[1] == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_default_config(dtype: torch.dtype) -> None:
    x, w = _inputs(5, 96, 200, dtype, seed=1)
    _check(sg.skinny_linear(x, w), x, w)


def test_semaphore_leaves_its_counters_zeroed_for_the_next_call() -> None:
    config = Cfg(16, 32, 64, split_k=4, num_warps=4, num_stages=2, combine="semaphore")
    for seed in range(3):  # the later calls rely on the counters the first left behind
        x, w = _inputs(3, 96, 256, torch.float32, seed=seed)
        _check(sg.skinny_linear(x, w, config), x, w)
        counters = sg._COUNTERS[sg._device_key(x.device)]
        assert counters.numel() >= sg.MIN_COUNTERS and not counters.any()


def test_semaphore_is_deterministic() -> None:
    config = Cfg(16, 32, 32, split_k=4, num_warps=4, num_stages=2, combine="semaphore")
    x, w = _inputs(8, 64, 256, torch.bfloat16, seed=2)
    assert torch.equal(sg.skinny_linear(x, w, config), sg.skinny_linear(x, w, config))


def test_x_with_row_or_column_strides() -> None:
    x, w = _inputs(5, 32, 64, torch.float32, seed=3)
    wide = torch.zeros(5, 100, device=DEVICE)
    wide[:, 10:74] = x
    _check(sg.skinny_linear(wide[:, 10:74], w, SPLIT1), x, w)  # row stride 100
    _check(sg.skinny_linear(x.T.contiguous().T, w, SPLIT1), x, w)  # column stride 5


def test_empty_dimensions() -> None:
    x, w = _inputs(0, 32, 64, torch.float32)
    assert sg.skinny_linear(x, w).shape == (0, 32)
    x, w = _inputs(3, 32, 0, torch.float32)
    out = sg.skinny_linear(x, w)
    assert out.shape == (3, 32) and not out.any()


def test_precompile_then_run() -> None:
    sg.precompile(3, 96, 200, torch.bfloat16, CASES[2][3])  # a no-op under the interpreter
    x, w = _inputs(3, 96, 200, torch.bfloat16)
    _check(sg.skinny_linear(x, w, CASES[2][3]), x, w)


def test_bad_inputs_raise_value_error() -> None:
    x, w = _inputs(2, 32, 64, torch.float32)
    bad = [
        (x[0], w, "must be \\[M, K\\]"),
        (x, w[:, :32], "K=64 columns"),
        (x.bfloat16(), w, "share one dtype"),
        (x.double(), w.double(), "share one dtype"),
        (x, torch.randn(64, 32, device=DEVICE).T, "row-major"),
    ]
    for a, b, match in bad:
        with pytest.raises(ValueError, match=match):
            sg.skinny_linear(a, b)
    with pytest.raises(ValueError, match="dtype"):
        sg.precompile(2, 32, 64, torch.float64)


@pytest.mark.parametrize("field", [
    dict(block_m=3), dict(block_n=48), dict(block_n=8), dict(block_k=2048), dict(split_k=0),
    dict(num_warps=3), dict(num_stages=0), dict(combine="reduce"),
])
def test_bad_config_raises_value_error(field: dict[str, object]) -> None:
    fields = dict(block_m=16, block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3)
    fields.update(field)
    with pytest.raises(ValueError, match=next(iter(field))):
        Cfg(**fields)


@pytest.mark.parametrize(("n", "k", "split"), [
    (4096, 4096, 4), (6144, 4096, 2), (4096, 14336, 4), (28672, 4096, 1),  # o, qkv, down, gate_up
])
def test_default_config_on_h200_shapes(n: int, k: int, split: int) -> None:
    for m, block_m in [(1, 16), (8, 16), (32, 32), (48, 64), (64, 64)]:
        c = sg.default_config(m, n, k, num_sms=132)
        assert (c.block_m, c.split_k, c.combine) == (block_m, split, "semaphore"), (m, c)
        assert k % (c.block_k * c.split_k) == 0  # whole tiles: no K masks
        assert c.num_stages * (c.block_n + c.block_m) * c.block_k * 2 <= 200 * 1024  # smem
        assert -(-n // c.block_n) * c.split_k >= 132 or c.split_k == 1  # a program per SM
    assert sg.default_config(200, n, k, num_sms=132).block_m == 64  # more rows: M tiles


# ---- on the GPU: Llama-3.1-8B shapes, CUDA graphs ----------------------------------------------
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096)])
def test_gpu_llama_shapes_default_config(n: int, k: int) -> None:
    for m in (1, 8, 32, 48, 64):
        x, w = _inputs(m, n, k, torch.bfloat16, seed=m)
        _check(sg.skinny_linear(x, w), x, w)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("combine", sg.COMBINES)
def test_gpu_graph_replay_follows_new_inputs(combine: str) -> None:
    config = Cfg(16, 64, 128, split_k=4, num_warps=4, num_stages=4, combine=combine)
    x, w = _inputs(5, 4096, 4096, torch.bfloat16)
    sg.skinny_linear(x, w, config)  # compile, and the counters, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [sg.skinny_linear(x, w, config) for _ in range(3)]  # counters reused in turn
    for seed in (1, 2):
        x.copy_(_inputs(5, 4096, 4096, torch.bfloat16, seed=seed)[0])
        graph.replay()
        torch.cuda.synchronize()
        for out in outs:
            _check(out, x, w)



# ---- as the dispatcher's ``linear`` operation ----------------------------------------------
def test_linear_keeps_f_linear_contract_on_both_sides_of_the_row_limit() -> None:
    x_short, w = _inputs(sg.MAX_SKINNY_ROWS, 48, 96, torch.float32)[:2]
    ref = x_short.double() @ w.double().T
    assert ((sg.linear(x_short, w).double() - ref).abs().max() < 1e-4).item()
    x_long = torch.randn(sg.MAX_SKINNY_ROWS + 1, 96, device=DEVICE)
    bias = torch.randn(48, device=DEVICE)
    assert torch.equal(sg.linear(x_long, w), torch.nn.functional.linear(x_long, w))
    assert torch.equal(sg.linear(x_short, w, bias), torch.nn.functional.linear(x_short, w, bias))


def _binder(operation: str):
    """Binds the tiny preset's kernels with only ``operation``'s Triton candidate left in."""
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
    others = {op: ("triton*",) for op in OPERATIONS if op != operation}
    sources = tuple(s for s in BACKEND_SOURCES if s[0] in ("torch", "triton"))

    def bind(prefer: dict[str, tuple[str, ...]]):
        return resolve_kernels(target, Policy(deny=others, prefer=prefer), ResolveOptions(sources=sources))

    return bind


def test_dispatcher_binds_the_skinny_gemm_first_on_cuda_and_cublas_on_the_cpu() -> None:
    bind = _binder("linear")
    default = bind({})
    if DEVICE.type == "cuda":
        assert default.kernels.linear is sg.linear
    else:  # under the interpreter the skinny kernel passes its check but the CPU order keeps cuBLAS's stand-in
        assert default.kernels.linear is torch.nn.functional.linear
        skinny_row = next(d for d in default.table if d.candidate == "triton.skinny_linear")
        assert skinny_row.status == "passed", skinny_row.reason
    preferred = bind({"linear": ("triton.skinny_linear",)})
    assert preferred.kernels.linear is sg.linear
    torch_first = bind({"linear": ("torch_ref.linear",)})
    assert torch_first.kernels.linear is torch.nn.functional.linear


# ---- SwiGLU fused into the down projection ----------------------------------------------------
def _gate_up(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """gate_up [m, 2k] (wide enough that silu is far from linear) and a down weight [n, k]."""
    g = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(m, 2 * k, generator=g)).to(dtype=dtype, device=DEVICE)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype=dtype, device=DEVICE)
    return gate_up, w


# the interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even), which biases
# every rounded activation the same way, so its errors add up along K
FUSED_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if CUDA else 3e-2}


def _check_fused(out: torch.Tensor, gate_up: torch.Tensor, w: torch.Tensor) -> None:
    """Against the reference activation (rounded to the dtype) times w, in fp32."""
    _check(out, torch_ref.swiglu(gate_up), w, FUSED_TOL[gate_up.dtype])


# (M, N, K, config): M from 1 to 64, odd K (37) and K ending mid-tile (100), N not a multiple of
# BLOCK_N (48), several M tiles (33 / 16), splits with both combines, and the CUDA-core path
FUSED_CASES = [
    (1, 32, 64, Cfg(16, 32, 32, split_k=1, num_warps=4, num_stages=2)),
    (3, 48, 37, Cfg(16, 32, 16, split_k=3, num_warps=4, num_stages=2, combine="semaphore")),
    (16, 32, 64, Cfg(16, 32, 32, split_k=2, num_warps=4, num_stages=2, combine="semaphore")),
    (33, 48, 100, Cfg(16, 32, 32, split_k=1, num_warps=4, num_stages=2)),
    (64, 32, 64, Cfg(64, 32, 16, split_k=2, num_warps=4, num_stages=2, combine="atomic")),
    (1, 32, 37, Cfg(1, 16, 16, split_k=2, num_warps=4, num_stages=2, combine="semaphore")),
    (3, 48, 64, Cfg(2, 32, 32, split_k=1, num_warps=4, num_stages=2)),
    (3, 32, 100, Cfg(4, 32, 32, split_k=3, num_warps=4, num_stages=2, combine="semaphore")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("m", "n", "k", "config"), FUSED_CASES,
    ids=_case_ids(FUSED_CASES),
)
def test_swiglu_linear_matches_reference(m: int, n: int, k: int, config: object,
                                         dtype: torch.dtype) -> None:
    gate_up, w = _gate_up(m, n, k, dtype)
    out = sg.swiglu_linear(gate_up, w, config)
    _check_fused(out, gate_up, w)
    # the activation is rounded as the swiglu kernel rounds it: the two-kernel path's bits
    assert torch.equal(out, sg.skinny_linear(sw.swiglu(gate_up), w, config))


def test_swiglu_linear_cases_really_split() -> None:
    plan = sg._plan(3, 48, 37, torch.float32, FUSED_CASES[1][3], swiglu=True)
    assert plan.grid == (2, 3, 1) and plan.combine == sg._SEMAPHORE
    assert plan.meta["SWIGLU"] and not plan.meta["EVEN_K"]
    assert not sg._plan(3, 48, 37, torch.float32, FUSED_CASES[1][3]).meta["SWIGLU"]


def test_swiglu_default_config_takes_the_cuda_cores_for_one_row() -> None:
    c = sg.swiglu_default_config(1, 4096, 14336, num_sms=132)
    assert (c.block_m, c.uses_dot, c.split_k) == (1, False, 4)
    assert 14336 % (c.block_k * c.split_k) == 0
    for m in (2, 16, 64):
        assert sg.swiglu_default_config(m, 4096, 14336) == sg.default_config(m, 4096, 14336)


def test_swiglu_linear_default_config_and_strided_gate_up() -> None:
    for m in (1, 5):
        gate_up, w = _gate_up(m, 96, 100, torch.bfloat16, seed=1)
        _check_fused(sg.swiglu_linear(gate_up, w), gate_up, w)
    wide = torch.zeros(5, 250, device=DEVICE, dtype=torch.bfloat16)
    wide[:, 30:230] = gate_up
    _check_fused(sg.swiglu_linear(wide[:, 30:230], w, SPLIT1), gate_up, w)  # row stride 250
    _check_fused(sg.swiglu_linear(gate_up.T.contiguous().T, w, SPLIT1), gate_up, w)


def test_swiglu_linear_empty_dimensions_and_precompile() -> None:
    gate_up, w = _gate_up(0, 32, 64, torch.float32)
    assert sg.swiglu_linear(gate_up, w).shape == (0, 32)
    gate_up, w = _gate_up(3, 32, 0, torch.float32)
    out = sg.swiglu_linear(gate_up, w)
    assert out.shape == (3, 32) and not out.any()
    sg.precompile(3, 48, 37, torch.bfloat16, FUSED_CASES[1][3], swiglu=True)  # interpreter: no-op


def test_swiglu_linear_bad_inputs_raise_value_error() -> None:
    gate_up, w = _gate_up(2, 32, 64, torch.float32)
    bad = [
        (gate_up[0], w, "must be \\[M, 2K\\]"),
        (gate_up[:, :64], w, "64 columns but weight has K=64"),
        (gate_up.bfloat16(), w, "share one dtype"),
        (gate_up, torch.randn(64, 32, device=DEVICE).T, "row-major"),
    ]
    for a, b, match in bad:
        with pytest.raises(ValueError, match=match):
            sg.swiglu_linear(a, b)


def test_swiglu_linear_op_fuses_up_to_the_row_limit_and_falls_back_beyond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate_up, w = _gate_up(sg.MAX_SKINNY_ROWS + 1, 40, 48, torch.float32, seed=4)
    fused_rows, skinny_rows = gate_up[: sg.MAX_FUSED_ROWS], gate_up[: sg.MAX_FUSED_ROWS + 1]
    fused = sg.swiglu_linear(fused_rows, w)

    def fail(*_: object) -> None:
        raise AssertionError("took the wrong path")

    with monkeypatch.context() as patched:  # few rows: the fused kernel alone
        patched.setattr(sg.swiglu_kernel, "swiglu", fail)
        assert torch.equal(sg.swiglu_linear_op(fused_rows, w), fused)
    with monkeypatch.context() as patched:  # more rows, or not 2-D: the swiglu kernel first
        patched.setattr(sg, "swiglu_linear", fail)
        act = sw.swiglu(gate_up)
        expected = sg.skinny_linear(act[: sg.MAX_FUSED_ROWS + 1], w)
        assert torch.equal(sg.swiglu_linear_op(skinny_rows, w), expected)
        assert torch.equal(sg.swiglu_linear_op(gate_up, w), torch.nn.functional.linear(act, w))
        batched = sg.swiglu_linear_op(fused_rows[:6].view(2, 3, 96), w)
        assert torch.equal(batched, torch.nn.functional.linear(act[:6], w).view(2, 3, 40))
    _check_fused(sg.swiglu_linear_op(gate_up, w), gate_up, w)


def test_dispatcher_binds_the_fused_down_projection_when_preferred() -> None:
    bind = _binder("swiglu_linear")
    default = bind({})
    if DEVICE.type == "cuda":
        assert default.kernels.swiglu_linear is sg.swiglu_linear_op
    else:  # the check ran the fused kernel (and its fallback) in the interpreter
        assert default.kernels.swiglu_linear is torch_ref.swiglu_linear
        row = next(d for d in default.table if d.candidate == "triton.swiglu_linear")
        assert row.status == "passed", row.reason
    preferred = bind({"swiglu_linear": ("triton.swiglu_linear",)})
    assert preferred.kernels.swiglu_linear is sg.swiglu_linear_op
    torch_first = bind({"swiglu_linear": ("torch_ref.swiglu_linear",)})
    assert torch_first.kernels.swiglu_linear is torch_ref.swiglu_linear


@needs_cuda
@pytest.mark.gpu
def test_gpu_fused_down_projection_on_llama_shapes() -> None:
    """Llama-3.1-8B's down projection: gate_up [M, 28672] by weight [4096, 14336]."""
    for m in (1, 2, 8, 32, 48, 64):
        gate_up, w = _gate_up(m, 4096, 14336, torch.bfloat16, seed=m)
        out = sg.swiglu_linear(gate_up, w)
        _check_fused(out, gate_up, w)
        config = sg.swiglu_default_config(m, 4096, 14336, sg.sm_count(gate_up.device))
        assert torch.equal(out, sg.skinny_linear(sw.swiglu(gate_up), w, config))
