"""Runs one step's batch through the decoder and samples the tokens it asks for."""

from __future__ import annotations

import torch

from livelm.daemon.engine.batch import build_batch
from livelm.daemon.engine.graphs import StepGraphs
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.sampling import SamplingParams, sampling_batch
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.model.decoder import LlamaDecoder


class ModelRunner:
    def __init__(self, decoder: LlamaDecoder, cache: KVCache, graphs: StepGraphs | None = None) -> None:
        self.decoder = decoder
        self.cache = cache
        self.device = decoder.device
        self.graphs = graphs  # steps of a captured shape replay these

    @torch.inference_mode()
    def run(
        self,
        chunks: list[Chunk],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> tuple[list[int], torch.Tensor | None]:
        """Returns the sampled token of each sampling chunk, and their float32 logits."""
        shape = self.graphs.shape_for(chunks) if self.graphs is not None else None
        if shape is not None:
            last_rows = self.graphs.run(chunks, shape)  # logits of every chunk's last token
            if not params:
                torch.cuda.synchronize(self.device)  # progress is reported for finished work only
                return [], None
            logits = last_rows if len(params) == len(chunks) else last_rows[[
                i for i, ch in enumerate(chunks) if ch.sample
            ]]
            tokens = self.decoder.kernels.sample(logits, sampling_batch(params, generators, self.device))
            return tokens.tolist(), logits
        batch = build_batch(chunks, self.cache.block_size, self.device)
        hidden = self.decoder(batch.input_ids, batch.positions, batch.meta, self.cache.layers)
        if not batch.sample_rows:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # progress is reported for finished work only
            return [], None
        rows = torch.tensor(batch.sample_rows, dtype=torch.int64, device=self.device)
        logits = self.decoder.logits(hidden.index_select(0, rows)).float()
        tokens = self.decoder.kernels.sample(
            logits, sampling_batch(params, generators, self.device)
        )
        return tokens.tolist(), logits
