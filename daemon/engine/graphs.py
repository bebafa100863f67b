"""One decode step captured as CUDA graphs, one per bucketed batch size, replayed per step.

Inputs live in static device buffers filled from pinned host buffers; rows past the real batch
are padding that reads and writes only the pool's scratch block. Sampling runs outside the
graph, on the captured logits.
"""

from __future__ import annotations

import torch

from livelm.daemon.engine.block_pool import SCRATCH_BLOCK
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.model.decoder import LlamaDecoder
from livelm.daemon.progress import Progress

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, decoder: LlamaDecoder, cache: KVCache, max_context: int, max_batch: int) -> None:
        self.decoder, self.cache, self.max_context = decoder, cache, max_context
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        rows, dev = self.buckets[-1], decoder.device
        self.width = -(-max_context // cache.block_size) + 1
        self._dev = {
            "ids": torch.zeros(rows, dtype=torch.int64, device=dev),
            "pos": torch.zeros(rows, dtype=torch.int64, device=dev),
            "slots": torch.zeros(rows, dtype=torch.int64, device=dev),
            "ctx": torch.ones(rows, dtype=torch.int32, device=dev),
            "tables": torch.zeros(rows, self.width, dtype=torch.int32, device=dev),
        }
        self._host = {k: torch.zeros_like(v, device="cpu").pin_memory() for k, v in self._dev.items()}
        self._starts = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self, progress: bool = True) -> None:
        pool = None
        with torch.inference_mode(), Progress(len(self.buckets), "capturing decode graphs", enabled=progress) as bar:
            for rows in reversed(self.buckets):  # largest first: the others fit in its pool
                self._forward(rows)  # compiles and warms every kernel outside the capture
                torch.cuda.synchronize(self.decoder.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(rows)
                pool = graph.pool()
                self._graphs[rows] = (graph, logits)
                bar.update(1)

    def _forward(self, rows: int) -> torch.Tensor:
        d = self._dev
        meta = AttentionMeta(
            slot_mapping=d["slots"][:rows],
            query_starts=self._starts[: rows + 1],
            context_lens=d["ctx"][:rows],
            block_tables=d["tables"][:rows],
            query_starts_list=list(range(rows + 1)),
            context_lens_list=[self.max_context] * rows,  # sizes the kernels' grids for any context
            decode_only=True,
        )
        hidden = self.decoder(d["ids"][:rows], d["pos"][:rows], meta, self.cache.layers)
        return self.decoder.logits(hidden).float()

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] of one decode token per chunk."""
        n = len(chunks)
        rows = next(b for b in self.buckets if b >= n)
        width = self._fill(chunks, n, rows)
        for key, dev in self._dev.items():
            src = self._host[key]
            if key == "tables":
                dev[:rows, :width].copy_(src[:rows, :width], non_blocking=True)
            else:
                dev[:rows].copy_(src[:rows], non_blocking=True)
        graph, logits = self._graphs[rows]
        graph.replay()
        return logits[:n]

    def _fill(self, chunks: list[Chunk], n: int, rows: int) -> int:
        h = {k: v.numpy() for k, v in self._host.items()}
        bs = self.cache.block_size
        width = 1
        for i, ch in enumerate(chunks):
            table, pos = ch.seq.block_table, ch.start
            h["ids"][i] = ch.seq.token_slice(pos, 1)[0]
            h["pos"][i] = pos
            h["slots"][i] = table[pos // bs] * bs + pos % bs
            h["ctx"][i] = pos + 1
            h["tables"][i, : len(table)] = table
            width = max(width, len(table))
        h["ids"][n:rows] = 0
        h["pos"][n:rows] = 0
        h["slots"][n:rows] = SCRATCH_BLOCK * bs
        h["ctx"][n:rows] = 1
        h["tables"][n:rows, 0] = SCRATCH_BLOCK
        return width
