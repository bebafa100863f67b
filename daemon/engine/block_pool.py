"""Fixed-size KV blocks with reference counts: who may read a block, and when it is free."""

from __future__ import annotations

import numpy as np

from livelm.protocol.errors import InternalError

SCRATCH_BLOCK = 0  # never handed out: padding rows of a captured batch write here


class BlockPool:
    """Hands out block ids; a block returns to the free list when its last holder lets go.

    Reference counts live in a numpy array so that sharing or releasing a long block table
    (a fork over a 32k context holds 2,000 blocks) is a few vector operations, not a Python
    loop. The blocks given to ``share`` and ``release`` are distinct ids, as in a block table.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks (one is scratch)")
        self.num_blocks = num_blocks
        self._refs = np.zeros(num_blocks, dtype=np.int32)
        self._refs[SCRATCH_BLOCK] = 1
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # low ids are handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return int(self._refs[block])

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise InternalError(
                f"KV pool exhausted: asked for {count} blocks, {len(self._free)} free"
            )
        if count <= 0:
            return []
        blocks = self._free[-count:][::-1]
        del self._free[-count:]
        self._refs[blocks] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        if blocks:
            self._refs[_ids(blocks)] += 1

    def release(self, blocks: list[int]) -> None:
        if not blocks:
            return
        ids = _ids(blocks)
        refs = self._refs[ids] - 1
        if (refs < 0).any():
            bad = ids[refs < 0][0]
            raise InternalError(f"block {bad} released more often than it was held")
        self._refs[ids] = refs
        self._free += ids[refs == 0].tolist()


def _ids(blocks: list[int]) -> np.ndarray:
    return np.fromiter(blocks, dtype=np.intp, count=len(blocks))
