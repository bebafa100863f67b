"""What a backend offers the dispatcher: candidate kernels and the shapes they accept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """The model and device a kernel would be bound for."""

    device: torch.device
    capability: tuple[int, int] | None  # CUDA compute capability, None on the CPU
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    block_size: int
    sliding_window: int | None
    vocab_size: int
    intermediate_size: int | None = None  # the MLP's; None: checks assume 4 x hidden_size


@dataclass(frozen=True)
class Candidate:
    operation: str  # one of ops.OPERATIONS
    backend: str  # torch_ref, torch_sdpa, torch_batched, triton, flex, flash_attn, xformers, ...
    name: str  # unique within the operation, e.g. "triton.paged_decode_splitk"
    fn: Callable
    # None when the kernel supports the target, else the reason it does not
    supports: Callable[[Target], str | None]
    graph_safe: bool = True  # may be captured in a CUDA graph
    # checked and bound only where the policy names it (lock, allow or prefer, by its full
    # name): a kernel still being measured, kept out of every start-up's checks until then
    opt_in: bool = False


class BackendUnavailable(Exception):
    """A backend's library is missing or does not load here; the message says why."""
