"""The hardware floor of PERFORMANCE.md, measured on the device in the same run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.daemon.model.config import ModelConfig


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # device-to-device, bytes read + written
    matmul_flops_per_s: float  # bf16


def _time_ms(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def _copy_ms(device: torch.device) -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB, random
    dst = torch.empty_like(src)
    return _time_ms(lambda: dst.copy_(src))


def _matmul_ms(device: torch.device) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    return _time_ms(lambda: a @ b)


def measure_ceilings(device: torch.device) -> Ceilings:
    copy_ms, mm_ms = _copy_ms(device), _matmul_ms(device)
    torch.cuda.empty_cache()
    return Ceilings(
        copy_bytes_per_s=2 * (1 << 30) * 2 / (copy_ms / 1e3),
        matmul_flops_per_s=2 * 8192**3 / (mm_ms / 1e3),
    )


def weight_bytes(config: ModelConfig, element: int = 2) -> int:
    c = config
    per_layer = (
        c.hidden_size * (c.q_size + 2 * c.kv_size)
        + c.q_size * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
    )
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    # the embedding table is only gathered from, so it is not counted as read
    return element * (c.num_layers * per_layer + head)


def kv_bytes_per_token(config: ModelConfig, element: int = 2) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


def forward_floor_ms(config: ModelConfig, ceilings: Ceilings, context: int, tokens: int) -> float:
    """The larger of reading the weights and KV once, and the matrix work, for ``tokens``."""
    moved = weight_bytes(config) + context * kv_bytes_per_token(config)
    memory_ms = moved / ceilings.copy_bytes_per_s * 1e3
    flops = 2 * tokens * weight_bytes(config) / 2
    compute_ms = flops / ceilings.matmul_flops_per_s * 1e3
    return max(memory_ms, compute_ms)


def prefill_floor_tokens_per_s(config: ModelConfig, ceilings: Ceilings) -> float:
    return ceilings.matmul_flops_per_s / (2 * weight_bytes(config) / 2)
