"""Fixed-size KV blocks with reference counts: who may read a block, and when it is free."""

from __future__ import annotations

from livelm.protocol.errors import InternalError

SCRATCH_BLOCK = 0  # never handed out: padding rows of a captured batch write here


class BlockPool:
    """Hands out block ids; a block returns to the free list when its last holder lets go."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks (one is scratch)")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._refs[SCRATCH_BLOCK] = 1
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise InternalError(
                f"KV pool exhausted: asked for {count} blocks, {len(self._free)} free"
            )
        blocks = [self._free.pop() for _ in range(count)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            refs = self._refs[b] - 1
            if refs < 0:
                raise InternalError(f"block {b} released more often than it was held")
            self._refs[b] = refs
            if refs == 0:
                self._free.append(b)
