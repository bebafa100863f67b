"""The operations the decoder calls, and the bound set of kernels chosen at startup.

The hot path calls the plain functions held here directly: no lookups, no per-call checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from livelm.daemon.kernels.attention_meta import AttentionMeta

OPERATIONS = (
    "rms_norm",
    "add_rms_norm",
    "rope",
    "rope_store_kv",
    "swiglu",
    "linear",
    "swiglu_linear",
    "prefill_attention",
    "decode_attention",
    "sample",
    "copy_kv_blocks",
)
# what a step's forward pass runs, and so what a CUDA graph of the step captures (sampling and
# block copies run outside the graphs)
FORWARD_OPERATIONS = OPERATIONS[: OPERATIONS.index("sample")]


class RmsNorm(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...


class AddRmsNorm(Protocol):
    """Returns (norm(x + residual), x + residual)."""

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Rope(Protocol):
    """Rotates q [N, Hq, D] and k [N, Hk, D] by the angles of ``positions`` (rotate-half style)."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class RopeStoreKV(Protocol):
    """Rotates q [N, Hq, D] and k [N, Hk, D] like ``Rope``, writes the rotated k and v [N, Hk, D]
    into the paged caches at ``slot_mapping`` (one slot per row) and returns the rotated q."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor: ...


class SwiGlu(Protocol):
    """silu(gate) * up, where gate_up = [gate | up] along the last dim."""

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor: ...


class Linear(Protocol):
    """x [N, K] @ weight[M, K]^T (+ bias [M]): ``torch.nn.functional.linear``'s contract."""

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class SwiGluLinear(Protocol):
    """linear(swiglu(gate_up), weight) for gate_up [N, 2I] and weight [H, I], no bias: the MLP's
    down projection with its activation, so that a kernel may fuse the two."""

    def __call__(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...


class PagedAttention(Protocol):
    """Attention of q [N, Hq, D] over each sequence's paged KV (the new tokens already written)."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings; temperature 0 means greedy."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = off
    generators: list[torch.Generator | None]
    all_greedy: bool
    filtered: bool = True  # some sampled row uses top-k or top-p (False lets a sampler skip them)


class Sample(Protocol):
    def __call__(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor: ...


class CopyKVBlocks(Protocol):
    """In the KV pool ``storage`` [layers, 2, blocks, block_size, kv_heads, head_dim], copies
    block ``src`` onto block ``dst`` for each (src, dst) of ``pairs`` (host ints), for every
    layer, K and V; destinations distinct and none of them a source."""

    def __call__(self, storage: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None: ...


@dataclass(frozen=True)
class Kernels:
    """One plain function per operation, bound once by the dispatcher."""

    rms_norm: RmsNorm
    add_rms_norm: AddRmsNorm
    rope: Rope
    rope_store_kv: RopeStoreKV
    swiglu: SwiGlu
    linear: Linear
    swiglu_linear: SwiGluLinear
    prefill_attention: PagedAttention
    decode_attention: PagedAttention
    sample: Sample
    copy_kv_blocks: CopyKVBlocks
    # bound forward operations that a CUDA graph cannot capture (they read host-side lists)
    graph_unsafe: frozenset[str] = frozenset()
