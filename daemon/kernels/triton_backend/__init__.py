"""Triton kernels of our own: paged prefill and split-K decode attention, norms, RoPE, SwiGLU,
the skinny GEMM for the projections (SwiGLU fused into the down projection's), and KV block
copies.

Importing this package never fails; ``candidates()`` raises BackendUnavailable when triton is
missing. The kernels run on CUDA (compute capability 8.0+), or on CPU tensors under
TRITON_INTERPRET=1 (set before triton and these modules are imported), which is how the tests
run them on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from livelm.daemon.kernels.candidates import BackendUnavailable, Candidate, Target

BACKEND = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GROUP = 64  # query heads per kv head: one prefill tile packs the whole group
MAX_NORM_DIM = 32768  # one row is held in registers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_reason(t: Target) -> str | None:
    if t.device.type == "cuda":
        if t.capability is not None and t.capability < (8, 0):
            return f"needs compute capability 8.0+, device has {t.capability[0]}.{t.capability[1]}"
        return None
    if t.device.type == "cpu" and _interpreting():
        return None
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU), not {t.device.type}"


def _dtype_reason(t: Target) -> str | None:
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype} not supported (fp16, bf16, fp32 only)"
    return None


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _attention_reason(t: Target) -> str | None:
    if not _is_pow2(t.head_dim) or not 16 <= t.head_dim <= MAX_HEAD_DIM:
        return f"head_dim {t.head_dim} is not a power of two in 16..{MAX_HEAD_DIM}"
    if t.num_kv_heads <= 0 or t.num_heads % t.num_kv_heads:
        return f"{t.num_heads} query heads do not split evenly over {t.num_kv_heads} kv heads"
    if t.num_heads // t.num_kv_heads > MAX_GROUP:
        return f"GQA group of {t.num_heads // t.num_kv_heads} heads exceeds {MAX_GROUP}"
    if not _is_pow2(t.block_size):
        return f"KV block_size {t.block_size} is not a power of two"
    return None


def _tma_attention_reason(t: Target) -> str | None:
    from livelm.daemon.kernels.triton_backend import tma

    reason = _attention_reason(t) or tma.unavailable_reason()
    if reason is not None:
        return reason
    if t.block_size != tma.PAGE:
        return f"loads whole {tma.PAGE}-token KV blocks; block_size is {t.block_size}"
    if t.device.type == "cuda" and t.capability is not None and t.capability < (9, 0):
        return "TMA needs compute capability 9.0+"
    return None


def _load_gluon_prefill() -> tuple[tuple[Callable, Callable] | None,
                                   Callable[[Target], str | None]]:
    """The Gluon prefill kernel alone and for split launches only (``gluon_prefill``), and
    their support check, importing Gluon only where it can run:
    a CUDA process that is not interpreting (under the interpreter, an import of Gluon after
    triton's interpreted standard library fails)."""
    if _interpreting() or not torch.cuda.is_available():
        return None, lambda t: "Gluon kernels run on a CUDA device only (no interpreter)"
    try:
        from livelm.daemon.kernels.triton_backend import gluon_prefill
    except ImportError as exc:
        why = f"Gluon does not import: {exc}"
        return None, lambda t: why

    def reason(t: Target) -> str | None:
        if t.device.type != "cuda" or t.capability != (9, 0):
            return "needs compute capability 9.0 (Hopper's warpgroup MMAs)"
        return gluon_prefill.unsupported_reason(t.dtype, t.head_dim, t.num_heads,
                                                t.num_kv_heads, t.block_size, t.sliding_window)

    return (gluon_prefill.paged_prefill_attention_gluon,
            gluon_prefill.paged_prefill_attention_gluon_splits), reason


def _not_loaded(*args: object, **kwargs: object) -> None:
    raise BackendUnavailable("the Gluon prefill kernel is not loaded in this process")


def _norm_reason(t: Target) -> str | None:
    if t.hidden_size > MAX_NORM_DIM or t.head_dim > MAX_NORM_DIM:
        return f"rows wider than {MAX_NORM_DIM} are not supported"
    return None


def _rope_reason(t: Target) -> str | None:
    if t.head_dim % 2 or t.head_dim > 1024:
        return f"head_dim {t.head_dim} must be even and at most 1024"
    return None


def _supports(*checks: Callable[[Target], str | None]) -> Callable[[Target], str | None]:
    def supports(target: Target) -> str | None:
        for check in (_device_reason, _dtype_reason, *checks):
            reason = check(target)
            if reason is not None:
                return reason
        return None

    return supports


def candidates() -> list[Candidate]:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("triton is not installed")
    try:
        from livelm.daemon.kernels.triton_backend import (
            block_copy,
            norms,
            paged_decode,
            paged_prefill,
            rope,
            skinny_gemm,
            swiglu,
        )
    except ImportError as exc:  # triton present but broken (e.g. no matching driver/compiler)
        raise BackendUnavailable(f"triton does not import: {exc}") from exc

    def make(op: str, name: str, fn: Callable, *checks: Callable, graph_safe: bool = True,
             opt_in: bool = False):
        return Candidate(op, BACKEND, f"triton.{name}", fn, _supports(*checks), graph_safe,
                         opt_in)

    gluon_kernels, gluon_reason = _load_gluon_prefill()
    gluon_alone, gluon_splits = gluon_kernels or (_not_loaded, _not_loaded)

    return [
        # both grids depend only on the batch's row and sequence counts (fixed in a captured
        # graph); the host lists only steer tile and split choices, which any replay survives
        # Hopper only, written in Gluon: each key tile's softmax overlaps the value product
        # (asynchronous warpgroup MMAs). First: in the stream bench (H100, three runs each) it
        # took the first token 0.1-0.3 ms lower at 8k-32k, push -> queryable p99 9.7 against
        # 10.6 ms, ingest within 1-3% (perf/NOTES.md, twelfth session)
        make("prefill_attention", "paged_prefill_gluon", gluon_alone, _attention_reason,
             gluon_reason),
        # with 64-token KV blocks on Hopper, prefill loads unsplit programs' key tiles by TMA
        # (faster long chunks); the pointer kernel everywhere else
        make("prefill_attention", "paged_prefill_tma", paged_prefill.paged_prefill_attention_tma,
             _tma_attention_reason),
        make("prefill_attention", "paged_prefill", paged_prefill.paged_prefill_attention,
             _attention_reason),
        # Gluon for split launches only, the TMA kernel for the rest: opt-in (a policy names
        # it); in the same runs it was no better than the Triton kernels alone
        make("prefill_attention", "paged_prefill_gluon_splits", gluon_splits, _attention_reason,
             _tma_attention_reason, gluon_reason, opt_in=True),
        make("decode_attention", "paged_decode_splitk", paged_decode.paged_decode_attention,
             _attention_reason),
        # decode with TMA loads: after the pointer kernel, bound only where a policy prefers
        # it (its 64-session step took 16.9 against 14.0 ms on an H200)
        make("decode_attention", "paged_decode_tma", paged_decode.paged_decode_attention_tma,
             _tma_attention_reason),
        make("rms_norm", "rms_norm", norms.rms_norm, _norm_reason),
        make("add_rms_norm", "add_rms_norm", norms.add_rms_norm, _norm_reason),
        make("rope", "rope", rope.rope, _rope_reason),
        make("rope_store_kv", "rope_store_kv", rope.rope_store_kv, _rope_reason),
        make("swiglu", "swiglu", swiglu.swiglu),
        # up to 64 rows through the skinny GEMM; the split merge's counters are allocated on
        # the first (eager) call and left zeroed by every call, so graphs may capture it
        make("linear", "skinny_linear", skinny_gemm.linear),
        # the down projection with SwiGLU fused into the skinny GEMM's x tiles (up to 16 rows;
        # the swiglu kernel then linear's kernel beyond), graph-safe as linear is
        make("swiglu_linear", "swiglu_linear", skinny_gemm.swiglu_linear_op),
        # a fork's partial block for every layer in one launch, with 64-bit offsets; its
        # pairs come from the host (several are staged through pinned memory): never captured
        make("copy_kv_blocks", "copy_kv_blocks", block_copy.copy_blocks, graph_safe=False),
    ]
