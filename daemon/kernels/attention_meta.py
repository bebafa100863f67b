"""What one forward step tells the attention kernels about its batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMeta:
    """A flattened batch: sequence b owns rows ``query_starts[b]:query_starts[b+1]`` of q.

    Its new tokens sit at the end of its context, which after this step holds
    ``context_lens[b]`` tokens in the blocks listed by ``block_tables[b]``.
    ``slot_mapping[i]`` is the KV-pool slot (block * block_size + offset) for row i.
    The ``*_list`` copies are host-side mirrors so reference kernels need no device sync.
    """

    slot_mapping: torch.Tensor  # [N] int64
    query_starts: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_starts_list: list[int]
    context_lens_list: list[int]
    decode_only: bool  # every sequence has exactly one new token

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_list)
