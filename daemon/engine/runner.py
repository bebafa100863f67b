"""Runs one step's batch through the decoder and samples the tokens it asks for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from livelm.daemon.engine.batch import build_batch
from livelm.daemon.engine.graphs import StepGraphs
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.sampling import SamplingParams, sampling_batch
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.kernels.transfer import to_device_async
from livelm.daemon.model.decoder import LlamaDecoder

SCORE_ROWS_PER_PASS = 256  # bounds the [rows, vocab] logits held at once while scoring


@dataclass
class StepOutput:
    tokens: list[int]  # the sampled token of each sampling chunk
    logits: torch.Tensor | None  # their float32 logits [sampling chunks, vocab]
    scores: list[list[float]] = field(default_factory=list)  # per score chunk, per row


@dataclass
class PendingStep:
    """A decode step launched but not yet read back: its sampled tokens are on the device
    (the next step's input ids) and on their way to pinned host memory.

    Reading them back waits on an event recorded right after the copy, not on the stream:
    by then the next step is usually queued behind this one, and a plain ``tolist`` of the
    device tensor would wait for that step too, leaving the GPU idle while the host reports
    and launches the step after it."""

    tokens: torch.Tensor  # int64 [sampling chunks], on the device
    host: torch.Tensor  # the same tokens in host memory, once ``copied`` has passed
    copied: torch.cuda.Event | None  # None when the tokens were computed on the CPU

    @classmethod
    def reading_back(cls, tokens: torch.Tensor) -> PendingStep:
        """Starts the copy of ``tokens`` to the host without waiting for it."""
        if tokens.device.type != "cuda":
            return cls(tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(tokens, host, copied)

    def collect(self) -> StepOutput:
        if self.copied is not None:
            self.copied.synchronize()  # this step's tokens, not whatever was queued after them
        return StepOutput(self.host.tolist(), None)


class ModelRunner:
    def __init__(
        self, decoder: LlamaDecoder, cache: KVCache, graphs: StepGraphs | None = None
    ) -> None:
        self.decoder = decoder
        self.cache = cache
        self.device = decoder.device
        self.graphs = graphs  # steps of a captured shape replay these
        self.eager_steps = 0  # steps no captured graph held (their launches cost host time)

    @torch.inference_mode()
    def run(
        self,
        chunks: list[Chunk],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> StepOutput:
        # captured graphs give only each chunk's last row, so scoring steps run eagerly
        eager = self.graphs is None or any(ch.score for ch in chunks)
        shape = None if eager else self.graphs.shape_for(chunks)
        if shape is not None and not params:  # session data: its KV only
            self.graphs.run_without_logits(chunks, shape)
            torch.cuda.synchronize(self.device)  # progress is reported for finished work only
            return StepOutput([], None)
        packed = None if eager or shape is not None else self.graphs.packed_for(chunks)
        if packed is not None:  # several sessions' data
            self.graphs.run_packed(chunks, packed)
            torch.cuda.synchronize(self.device)
            return StepOutput([], None)
        if shape is not None:
            last_rows = self.graphs.run(chunks, shape)  # logits of every chunk's last token
            logits = (
                last_rows
                if len(params) == len(chunks)
                else last_rows[[i for i, ch in enumerate(chunks) if ch.sample]]
            )
            tokens = self.decoder.kernels.sample(
                logits, sampling_batch(params, generators, self.device)
            )
            return StepOutput(tokens.tolist(), logits)
        self.eager_steps += 1
        batch = build_batch(chunks, self.cache.block_size, self.device)
        hidden = self.decoder(batch.input_ids, batch.positions, batch.meta, self.cache.layers)
        scores = self._scores(hidden, batch.score_rows, batch.score_targets, chunks)
        if not batch.sample_rows:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # progress is reported for finished work only
            return StepOutput([], None, scores)
        rows = torch.tensor(batch.sample_rows, dtype=torch.int64, device=self.device)
        logits = self.decoder.logits(hidden.index_select(0, rows)).float()
        tokens = self.decoder.kernels.sample(
            logits, sampling_batch(params, generators, self.device)
        )
        return StepOutput(tokens.tolist(), logits, scores)

    @torch.inference_mode()
    def launch_decode(
        self,
        chunks: list[Chunk],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        feed: torch.Tensor | None,
    ) -> PendingStep:
        """Launches a step that samples one token per chunk (decode rows, or questions' last
        chunks) without waiting for it.

        ``feed``: each chunk's input id on the device (the previous step's sampled tokens), for
        decode rows whose last token the host does not know yet; None takes them from the
        chunks.
        """
        shape = None if self.graphs is None else self.graphs.shape_for(chunks)
        if shape is not None:
            logits = self.graphs.run(chunks, shape, feed)
        else:
            self.eager_steps += 1
            batch = build_batch(chunks, self.cache.block_size, self.device)
            if feed is not None:  # a decode batch holds one row per chunk, in chunk order
                batch.input_ids[: len(chunks)].copy_(feed)
            hidden = self.decoder(batch.input_ids, batch.positions, batch.meta, self.cache.layers)
            if len(batch.sample_rows) != hidden.shape[0]:  # longer chunks: their last rows
                rows = to_device_async(torch.tensor(batch.sample_rows, dtype=torch.int64),
                                       self.device)
                hidden = hidden.index_select(0, rows)
            logits = self.decoder.logits(hidden).float()
        tokens = self.decoder.kernels.sample(logits, sampling_batch(params, generators, self.device))
        return PendingStep.reading_back(tokens)

    @property
    def graph_steps(self) -> int:
        """Steps that replayed a captured graph."""
        return 0 if self.graphs is None else self.graphs.replayed

    def _scores(
        self, hidden: torch.Tensor, rows: list[int], targets: list[int], chunks: list[Chunk]
    ) -> list[list[float]]:
        """Each score row's log-probability of its target token, split by score chunk."""
        if not rows:
            return []
        row_ids = torch.tensor(rows, dtype=torch.int64, device=self.device)
        target_ids = torch.tensor(targets, dtype=torch.int64, device=self.device)
        parts = []
        for at in range(0, len(rows), SCORE_ROWS_PER_PASS):
            part = slice(at, at + SCORE_ROWS_PER_PASS)
            logits = self.decoder.logits(hidden.index_select(0, row_ids[part])).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            parts.append(logprobs.gather(1, target_ids[part, None]).squeeze(1))
        flat = torch.cat(parts).tolist()
        out, at = [], 0
        for ch in chunks:
            if ch.score:
                out.append(flat[at : at + ch.length])
                at += ch.length
        return out
