"""The paged KV pool's tensors and how many blocks fit in memory."""

from __future__ import annotations

import torch

from livelm.daemon.kernels import torch_ref
from livelm.daemon.kernels.ops import CopyKVBlocks
from livelm.daemon.model.config import ModelConfig

CPU_KV_BUDGET_BYTES = 1 << 30
MAX_AUTO_TOKENS = 1 << 20


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


def auto_kv_tokens(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, memory_fraction: float
) -> int:
    """Tokens the pool can hold: a share of free GPU memory, or a fixed budget on the CPU."""
    per_token = bytes_per_token(config, dtype)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * memory_fraction)
    else:
        budget = CPU_KV_BUDGET_BYTES
    return min(budget // per_token, MAX_AUTO_TOKENS)


class KVCache:
    """Per layer, K and V of shape [num_blocks, block_size, kv_heads, head_dim].

    All of them are views of one tensor [layers, 2, blocks, ...], so copying a block for every
    layer at once is a single kernel (a fork's partial block, copy-on-write).
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        copy: CopyKVBlocks = torch_ref.copy_kv_blocks,
    ) -> None:
        """``copy``: the bound ``copy_kv_blocks`` kernel (the reference by default)."""
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.storage = torch.zeros((config.num_layers, 2, *shape), dtype=dtype, device=device)
        self.layers = [(layer[0], layer[1]) for layer in self.storage]
        self._copy = copy

    def copy_block(self, src: int, dst: int) -> None:
        self.copy_blocks([(src, dst)])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block copies (source, destination) for every layer, whatever their number (the
        forks of many questions arriving at once) in the launches of one kernel call.
        Destinations must be distinct and none may be a source."""
        if pairs:
            self._copy(self.storage, pairs)
