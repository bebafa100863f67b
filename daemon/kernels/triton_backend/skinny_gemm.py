"""Skinny GEMM: ``out[M, N] = x[M, K] @ weight[N, K]^T`` for a few activation rows (M = 1..64),
and the MLP's down projection with SwiGLU fused in: ``swiglu(gate_up[M, 2K]) @ weight[N, K]^T``.

At these row counts the product is bound by reading the weight once from HBM; cuBLAS reaches
only 1.3-1.8x of that floor on Llama-3.1-8B's smaller projections (o, qkv) on an H200, which
loses to fixed launch and tail costs and to a separate split-K reduce kernel. This kernel aims
to stream the weight at close to copy bandwidth instead.

Design:

- Grid (N tiles, K splits, M tiles). A program streams one BLOCK_N x (K / splits) slab of the
  weight exactly once, BLOCK_K columns per step (software-pipelined ``num_stages`` deep, loaded
  evict-first), together with the matching x tile (small and shared by every program, so it is
  loaded evict-last and stays in L2), and accumulates in fp32. M tiles only appear when M
  exceeds BLOCK_M.
- The product is computed transposed, ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T``, so the
  weight (the large operand) fills the MMA's M side; both operands are K-contiguous as loaded.
- ``block_m >= 16``: ``tl.dot`` on the tensor cores (rows past M are zero padding). ``block_m < 16``
  (1, 2, 4 or 8): a multiply + row sum on the CUDA cores, one activation row at a time, which
  avoids padding M up to 16 (worth sweeping for M = 1 or 2).
- Weight rows past N wrap (``% N``) instead of being masked, and K columns are masked only when
  K does not split into whole BLOCK_K steps (EVEN_K), so weight loads stay unmasked 16-byte
  vectors. Activation rows past M are masked (a mask constant along K), so not fetched.
- Split-K partial sums are combined in the same kernel launch when ``split_k > 1``, by one of
  ``COMBINES``:

  * ``"semaphore"``: each program writes its fp32 partial to its own slot of a workspace
    [splits, M, N], then takes a ticket from its output tile's arrival counter; the last to
    arrive sums the slots in split order (deterministic: bitwise the same on every run),
    writes the output, and resets the counter to zero. One launch. The counters live in a
    per-device buffer that every call leaves zeroed, so it is allocated once (outside graph
    capture; see ``_counters``). Calls that share a device must not run concurrently on
    different streams.
  * ``"atomic"``: each program adds its partial into a zero-initialized fp32 buffer with fp32
    atomics. No persistent state, but a memset before and (for 16-bit outputs) a cast kernel
    after: three launches, and the summation order varies from run to run.

  ``split_k`` is an upper bound: splits are whole BLOCK_K steps, so fewer may be launched.
- SWIGLU (``swiglu_linear``): x is gate_up [M, 2K], and each x tile is formed in registers as
  silu(gate) * up from columns [k0, k0 + BLOCK_K) and [K + k0, ...), rounded like the separate
  swiglu kernel (silu rounded to the dtype, then the product), so the result matches
  ``skinny_linear(swiglu(gate_up), weight)``. It saves the swiglu launch and its round trip
  through HBM, but every N tile's program recomputes the activation of its x tiles (exp,
  divide and bf16 rounding, on the slow special-function and conversion units), which only
  hides under the weight stream for a few rows. On the H200 (Llama-3.1-8B's down projection,
  quick sweeps of ``perf/skinny_gemm_bench.py``): 31.2 / 32.7 / 33.5 µs fused against about
  31.7 / 33.8 / 34.1 µs for the swiglu kernel then this GEMM at M = 1 / 8 / 16, but at M = 32
  the best fused config takes 37.4 µs (the default config 73 µs, 169 µs at M = 64) against
  about 35 µs unfused. Hence ``MAX_FUSED_ROWS``.
- Compiles: M is a runtime argument (``do_not_specialize``), the split count is read from the
  grid, so for one weight shape the only M-dependent compile-time constant is BLOCK_M (a power
  of two): at most one compile per (config, BLOCK_M), never one per M.
- CUDA graphs: no host syncs and no data-dependent allocation. Each call allocates its output
  and, for split-K, a workspace whose size depends only on the shape and config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from livelm.daemon.kernels.triton_backend import pdl
from livelm.daemon.kernels.triton_backend import swiglu as swiglu_kernel
from livelm.daemon.kernels.triton_backend.paged_decode import sm_count
from livelm.daemon.kernels.triton_backend.pdl import wait_for_producer

H200_SMS = 132
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
COMBINES = ("semaphore", "atomic")
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2

_STORE, _ATOMIC, _SEMAPHORE = 0, 1, 2  # the kernel's COMBINE: how a program ends its tile
_COMBINE_CODES = {"atomic": _ATOMIC, "semaphore": _SEMAPHORE}
_C_STORE, _C_ATOMIC = tl.constexpr(_STORE), tl.constexpr(_ATOMIC)  # as the kernel sees them


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiling of ``skinny_linear``. ``block_m < 16`` selects the CUDA-core path (no tl.dot)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    combine: str = "semaphore"  # how split_k > 1 partials are summed: one of COMBINES

    def __post_init__(self) -> None:
        checks = (
            (_is_pow2(self.block_m) and self.block_m <= 256,
             "block_m must be a power of two <= 256"),
            (_is_pow2(self.block_n) and 16 <= self.block_n <= 256,
             "block_n must be a power of two in 16..256"),
            (_is_pow2(self.block_k) and 16 <= self.block_k <= 1024,
             "block_k must be a power of two in 16..1024"),
            (1 <= self.split_k <= MAX_GRID_YZ, f"split_k must be in 1..{MAX_GRID_YZ}"),
            (_is_pow2(self.num_warps) and self.num_warps <= 32,
             "num_warps must be a power of two <= 32"),
            (self.num_stages >= 1, "num_stages must be >= 1"),
            (self.combine in COMBINES, f"combine must be one of {COMBINES}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")

    @property
    def uses_dot(self) -> bool:
        return self.block_m >= 16


def default_config(m: int, n: int, k: int, num_sms: int = H200_SMS,
                   dtype_bytes: int = 2) -> SkinnyConfig:
    """The split rule that measured best inside the captured H200 step (perf/NOTES.md): a
    one-wave rule (fewer splits, five stages) took decode at 19k from 4.98 to 5.44 ms, and the
    isolated sweep's best config per shape from 4.51 / 5.06 to 4.67 / 5.21 ms at 3k / 19k,
    though both won in isolation: with PDL, a grid that fills every SM lets the next kernel's
    programs start sooner.

    16-bit: 64 x 128 weight tiles (16 KiB per stage) four stages deep keep about 64 KiB of the
    weight in flight per program. K is split (in powers of two, into whole tiles of at least
    four steps each) until there is a program per SM, and the semaphore combine keeps that one
    launch: o-proj 64 N tiles x 4 splits, qkv 96 x 2, down 64 x 4, gate_up 448 x 1.
    """
    block_m = min(64, max(16, triton.next_power_of_2(max(m, 1))))
    block_n = min(64, max(16, triton.next_power_of_2(max(n, 1))))
    block_k = min(128 if dtype_bytes <= 2 else 64, max(16, triton.next_power_of_2(max(k, 1))))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(max(m, 1), block_m)
    split = _split_count(tiles, k, block_k, num_sms)
    return SkinnyConfig(block_m, block_n, block_k, split, num_warps=4,
                        num_stages=4 if block_m <= 32 else 3, combine="semaphore")


def swiglu_default_config(m: int, n: int, k: int, num_sms: int = H200_SMS,
                          dtype_bytes: int = 2) -> SkinnyConfig:
    """``default_config`` for ``swiglu_linear``, except that a single row takes the CUDA-core
    path, so its activation is computed for that row alone rather than for 16 padded rows
    (H200, the down projection at M = 1: 30.4-31.2 µs with m1 n32 k256 s4 against 31.4 µs with
    the default dot tiles; at M = 2 the CUDA-core path lost, 41.3 µs against 32.3 µs). Splits as
    ``default_config`` does, until there are two programs per SM."""
    config = default_config(m, n, k, num_sms, dtype_bytes)
    if m > 1:
        return config
    block_n, block_k = 32, 256 if dtype_bytes <= 2 else 128
    split = _split_count(triton.cdiv(n, block_n), k, block_k, 2 * num_sms)
    # one stage: each K step's loads are used in the same iteration. Three stages prefetch
    # the weight through shared memory; alone that measured 30.3 us (m1 n16 k512 s1) against
    # 37.6, but inside the captured decode step it took the step from 4.56 / 5.01 / 5.42 to
    # 5.08 / 5.53 / 5.99 ms at 3k / 19k / 34k (perf/NOTES.md, 2026-12-03 seventh session)
    return replace(config, block_m=1, block_n=block_n, block_k=block_k, split_k=split,
                   num_stages=1)


def _split_count(tiles: int, k: int, block_k: int, programs: int) -> int:
    """K splits, doubled while ``tiles`` x splits stays under ``programs`` and each split
    keeps whole BLOCK_K steps, at least four of them."""
    split = 1
    while tiles * split < programs and k % (2 * split * block_k) == 0 and k // (2 * split) >= 4 * block_k:
        split *= 2
    return split


def _default_for(swiglu: bool):
    return swiglu_default_config if swiglu else default_config


# ---- kernel ------------------------------------------------------------------------------------
@triton.jit
def _load_w(ptrs, k_ok, EVEN_K: tl.constexpr):
    """A weight tile, read once (evict-first); unmasked when K splits into whole BLOCK_K steps,
    which keeps the loads 16-byte vectors (rows past N wrap instead of being masked)."""
    if EVEN_K:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=k_ok, other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _load_x(ptrs, rows_ok, k_ok, EVEN_K: tl.constexpr):
    """An activation tile, read by every program (evict-last); rows past M are not fetched."""
    if EVEN_K:
        mask = rows_ok
    else:
        mask = rows_ok & k_ok
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_last")


@triton.jit
def _silu_mul(gate, up):
    """silu(gate) * up in fp32, silu rounded to the inputs' dtype first: the swiglu kernel's
    rounding, so the fused product feeds the GEMM the same values."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _load_act(ptrs, rows_ok, k_ok, K, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr):
    """An x tile: loaded as is, or (SWIGLU) silu(gate) * up with up K columns after gate.
    Masked elements load as zero in both halves, and silu(0) * 0 keeps them zero."""
    x = _load_x(ptrs, rows_ok, k_ok, EVEN_K)
    if SWIGLU:
        x = _silu_mul(x, _load_x(ptrs + K, rows_ok, k_ok, EVEN_K))
    return x


@triton.jit
def _dot_rows(acc, w, x_ptrs, m_ok, k_ok, K, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, SWIGLU: tl.constexpr):
    """acc += w @ x^T on the tensor cores; UPCAST works around the interpreter's bf16 dot."""
    x = _load_act(x_ptrs, m_ok[:, None], k_ok[None, :], K, EVEN_K, SWIGLU)
    if UPCAST:
        acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fma_rows(acc, w, x_cols, m0, M, K, stride_xm, cols, k_ok, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, SWIGLU: tl.constexpr):
    """acc[:, i] += w @ x[m0 + i] on the CUDA cores, one activation row at a time."""
    wf = w.to(tl.float32)
    rows = tl.arange(0, BLOCK_M)
    for i in tl.static_range(BLOCK_M):
        row_ptrs = x_cols + (m0 + i).to(tl.int64) * stride_xm
        row_ok = cols * 0 + (m0 + i) < M  # a vector, not a scalar: the interpreter needs it
        row = _load_act(row_ptrs, row_ok, k_ok, K, EVEN_K, SWIGLU).to(tl.float32)
        part = tl.sum(wf * row[None, :], axis=1)
        acc += tl.where(rows[None, :] == i, part[:, None], 0.0)
    return acc


@triton.jit
def _semaphore_combine(acc, out_ptr, ws_ptr, lock_ptr, offs, mask, M, N):
    """Write this split's partial; the last split of the tile to arrive sums them all."""
    splits = tl.num_programs(1)
    plane = M.to(tl.int64) * N
    tl.store(ws_ptr + tl.program_id(1) * plane + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the ticket releases it
    lock = lock_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    ticket = tl.atomic_add(lock, 1, sem="acq_rel")
    if ticket == splits - 1:
        total = tl.zeros_like(acc)
        for s in range(0, splits):  # split order: the same sum whichever program is last
            total += tl.load(ws_ptr + s * plane + offs, mask=mask, other=0.0,
                             cache_modifier=".cg")
        tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(lock, 0)  # leave the counter zeroed for the next call


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr, w_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_wn, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMBINE: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, SWIGLU: tl.constexpr, USE_PDL: tl.constexpr,
    STAGES: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    cols = tl.arange(0, BLOCK_K)
    offs_k = k_lo + cols
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    x_cols = x_ptr + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # the loop's own stage count: the same as the launch's for the dot path; the CUDA-core
    # path's loads feed no dot, and only a loop-level count has triton pipeline them at all
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k_ok = k0 + cols < k_hi
        w = _load_w(w_ptrs, k_ok[None, :], EVEN_K)
        if USE_DOT:
            acc = _dot_rows(acc, w, x_ptrs, m_ok, k_ok, K, EVEN_K, UPCAST, PRECISION, SWIGLU)
        else:
            acc = _fma_rows(acc, w, x_cols, m0, M, K, stride_xm, cols, k_ok, EVEN_K, BLOCK_M,
                            SWIGLU)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        x_cols += BLOCK_K
    offs = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    if COMBINE == _C_STORE:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif COMBINE == _C_ATOMIC:
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
    else:
        _semaphore_combine(acc, out_ptr, ws_ptr, lock_ptr, offs, mask, M, N)


# ---- host side ---------------------------------------------------------------------------------
def is_interpreted() -> bool:
    return not isinstance(_skinny_kernel, triton.runtime.JITFunction)


_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counter buffers that captured graphs may still use
MIN_COUNTERS = 4096


def _device_key(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda" and device.index is None:
        return device.type, torch.cuda.current_device()
    return device.type, device.index or 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, left zeroed by every launch, so kept per device.

    During graph capture with no buffer large enough yet, a temporary one is returned instead:
    its zero-fill is captured with the graph and runs on every replay (correct, one memset
    more). Warm up outside capture to avoid it.
    """
    key = _device_key(device)
    cached = _COUNTERS.get(key)
    if cached is not None and cached.numel() >= count:
        return cached
    if _capturing(device):
        return torch.zeros(count, dtype=torch.int32, device=device)
    if cached is not None:
        _RETIRED.append(cached)
    fresh = torch.zeros(triton.next_power_of_2(max(count, MIN_COUNTERS)), dtype=torch.int32,
                        device=device)
    _COUNTERS[key] = fresh
    return fresh


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} columns but weight has K={weight.shape[1]}")
    _check_operands("x", x, weight)


def _check_gate_up(gate_up: torch.Tensor, weight: torch.Tensor) -> None:
    if gate_up.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gate_up must be [M, 2K] and weight [N, K], got "
                         f"{tuple(gate_up.shape)} and {tuple(weight.shape)}")
    if gate_up.shape[1] != 2 * weight.shape[1]:
        raise ValueError(f"gate_up has {gate_up.shape[1]} columns but weight has "
                         f"K={weight.shape[1]}: gate_up must be [gate | up], 2K columns")
    _check_operands("gate_up", gate_up, weight)


def _check_operands(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise ValueError(f"{name} and weight must share one dtype of {DTYPES}, got {x.dtype} "
                         f"and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError("weight must be row-major (unit stride along K), e.g. an nn.Linear "
                         "weight; pass weight.contiguous() once, not per call")


class _Plan(NamedTuple):
    grid: tuple[int, int, int]  # (N tiles, K splits, M tiles)
    k_per_split: int  # whole BLOCK_K steps
    combine: int  # _STORE, _ATOMIC or _SEMAPHORE
    meta: dict[str, object]  # the kernel's constexprs, num_warps and num_stages


def _plan(m: int, n: int, k: int, dtype: torch.dtype, config: SkinnyConfig,
          swiglu: bool = False) -> _Plan:
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(k, k_per_split),
            triton.cdiv(m, config.block_m))
    if grid[2] > MAX_GRID_YZ:
        raise ValueError(f"M={m} needs {grid[2]} row tiles of block_m={config.block_m}, more "
                         f"than the grid allows ({MAX_GRID_YZ})")
    combine = _COMBINE_CODES[config.combine] if grid[1] > 1 else _STORE
    meta = dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        COMBINE=combine, USE_DOT=config.uses_dot, EVEN_K=k % k_per_split == 0,
        # fp32 uses exact products (not tf32), to match an fp32 reference
        UPCAST=is_interpreted() and dtype == torch.bfloat16,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        SWIGLU=swiglu, STAGES=config.num_stages,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return _Plan(grid, k_per_split, combine, meta)


def _launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, config: SkinnyConfig,
            swiglu: bool) -> None:
    m, (n, k) = x.shape[0], weight.shape
    plan = _plan(m, n, k, x.dtype, config, swiglu)
    ws, locks = out, out  # placeholders where unused
    if plan.combine == _ATOMIC:  # accumulate into zeroed fp32, then cast
        ws = out.zero_() if out.dtype == torch.float32 else torch.zeros(
            (m, n), device=out.device, dtype=torch.float32)
    elif plan.combine == _SEMAPHORE:  # a slot per split, and the tile counters
        ws = torch.empty(plan.grid[1] * m * n, device=out.device, dtype=torch.float32)
        locks = _counters(out.device, plan.grid[0] * plan.grid[2])
    _skinny_kernel[plan.grid](
        x, weight, out, ws, locks,
        m, n, k, x.stride(0), weight.stride(0), plan.k_per_split, **plan.meta,
        **pdl.launch_args(x.device),
    )
    if ws is not out and plan.combine == _ATOMIC:
        out.copy_(ws)


def precompile(m: int, n: int, k: int, dtype: torch.dtype,
               config: SkinnyConfig | None = None, swiglu: bool = False) -> None:
    """Compile, without launching, what ``skinny_linear`` runs for a contiguous x [m, k] and
    weight [n, k] of ``dtype`` on the current CUDA device (with ``swiglu``: what
    ``swiglu_linear`` runs for a contiguous gate_up [m, 2k]): at startup, say, or for many
    configs at once under triton's AsyncCompileMode. Any M with the same BLOCK_M shares the
    compile. A no-op under the interpreter."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if is_interpreted() or 0 in (m, n, k):
        return
    itemsize = torch.finfo(dtype).bits // 8
    config = config or _default_for(swiglu)(m, n, k, sm_count(torch.device("cuda")), itemsize)
    plan = _plan(m, n, k, dtype, config, swiglu)
    ws = torch.float32 if plan.combine != _STORE else dtype
    locks = torch.int32 if plan.combine == _SEMAPHORE else dtype
    stride_xm = 2 * k if swiglu else k
    _skinny_kernel.warmup(dtype, dtype, dtype, ws, locks, m, n, k, stride_xm, k,
                          plan.k_per_split, grid=plan.grid, **plan.meta,
                          **pdl.launch_args(torch.device("cuda")))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """``x @ weight.T`` for x [M, K] and weight [N, K] (row-major), fp32 accumulation.

    Returns a new [M, N] tensor in x's dtype. ``config`` defaults to ``default_config``.
    """
    _check_inputs(x, weight)
    return _gemm(x, weight, config, swiglu=False)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """``swiglu(gate_up) @ weight.T`` for gate_up [M, 2K] = [gate | up] and weight [N, K]
    (row-major), the activation computed as the x tiles load: ``skinny_linear(swiglu(gate_up),
    weight)`` in one launch. Returns a new [M, N] tensor in gate_up's dtype."""
    _check_gate_up(gate_up, weight)
    return _gemm(gate_up, weight, config, swiglu=True)


def _gemm(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig | None,
          swiglu: bool) -> torch.Tensor:
    m, (n, k) = x.shape[0], weight.shape
    if config is None:
        config = _default_for(swiglu)(m, n, k, sm_count(x.device), x.element_size())
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    _launch(x, weight, out, config, swiglu)
    return out


MAX_SKINNY_ROWS = 64  # beyond this cuBLAS tiles M well and the weight is no longer the bound


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear``'s contract, as the dispatcher's ``linear`` operation: the skinny kernel for
    up to 64 rows without a bias (the decoder's projections in decode and question steps),
    cuBLAS for longer chunks and biased projections."""
    if bias is not None or x.dim() != 2 or x.shape[0] > MAX_SKINNY_ROWS:
        return F.linear(x, weight, bias)
    return skinny_linear(x, weight)


MAX_FUSED_ROWS = 16  # beyond this the fused kernel's recomputed activation costs more than
# the separate swiglu launch (see the module's docstring)


def swiglu_linear_op(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The dispatcher's ``swiglu_linear`` operation, ``linear(swiglu(gate_up), weight)``: the
    fused kernel for up to 16 rows (decode steps), else the swiglu kernel then ``linear`` (the
    skinny kernel up to 64 rows, cuBLAS for longer chunks)."""
    if gate_up.dim() != 2 or gate_up.shape[0] > MAX_FUSED_ROWS:
        return linear(swiglu_kernel.swiglu(gate_up), weight)
    return swiglu_linear(gate_up, weight)
