"""Steps captured as CUDA graphs and replayed: decode batches (B sequences x 1 token) and short
question prefills (1 sequence x L tokens), one graph per bucketed shape. Prefill shapes are
captured twice: with the logits of the last row (a question), and without (a little session
data, where the vocabulary projection would be wasted work on the way to "queryable").
Longer session-data chunks, up to ``max_data`` tokens, have graphs without logits only: an
eager step launches about 450 kernels from Python, which on the H200's host took 27 ms, so
an eager step of up to about a thousand tokens was bound by the host, not the GPU.

Inputs live in static device buffers filled from pinned host buffers. Rows past a chunk's
real tokens, and sequences past the real batch, are padding: they write only the pool's
scratch block and their results are never read. Sampling runs outside the graph, on the
captured logits of each sequence's last real row.
"""

from __future__ import annotations

import collections
import contextlib

import torch

from livelm.daemon.engine.batch import padded_width
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.engine.staging import StagingArrays, StepStaging
from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.model.decoder import LlamaDecoder
from livelm.daemon.progress import Progress
from livelm.protocol.errors import ConfigError

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PREFILL_BUCKETS = (8, 16, 32, 48, 64, 96, 128)
# session data past the question sizes: at most an eighth of padding from 256 to 2048 tokens,
# a quarter past that; start-up timing then drops the sizes a larger one replays faster
DATA_BUCKETS = (192, 224, 256, 288, 320, 352, 384, 416, 448, 480, 512, 576, 640, 704, 768, 832,
                896, 960, 1024, 1152, 1280, 1408, 1536, 1664, 1792, 1920, 2048, 2304, 2560,
                3072, 3584, 4096)
# a larger data graph must replay at least this much faster to take a smaller one's chunks
SLOWER_MARGIN = 0.03
PACKED_MIN_ROWS = 16  # the smallest packed step: two sessions' records of a few tokens each
# the largest: 4 / 8 sessions' records (202 / 404 rows) replayed in half the eager time (H100,
# fan-out bench), but 16 sessions' (808 rows, padded to 896) took 30.9 ms replayed against
# 27.7 eager in the median (H200): near a thousand rows the eager step is no longer host-bound
PACKED_MAX_ROWS = 640

Shape = tuple[int, int]  # (sequences, rows per sequence)
Variant = tuple[Shape, bool]  # a shape, and whether the graph computes logits


class StepGraphs:
    def __init__(
        self, decoder: LlamaDecoder, cache: KVCache, max_context: int, max_batch: int,
        max_question: int, max_data: int = 0, max_data_seqs: int = 0,
    ) -> None:
        self.decoder, self.cache, self.max_context = decoder, cache, max_context
        self.decode_sizes = [b for b in DECODE_BUCKETS if b <= max_batch] or [1]
        self.prefill_sizes = [n for n in PREFILL_BUCKETS if n <= max_question]
        longest = max(self.prefill_sizes, default=0)
        self.data_sizes = data_sizes(longest, max_data)
        # several sessions' data packed into one step: up to max_data_seqs sessions, plus the
        # sequence that holds the padding rows
        self.packed_seqs = max_data_seqs + 1 if max_data_seqs > 0 else 0
        self.packed_sizes = packed_sizes(max_data) if max_data_seqs > 0 else []
        seqs = max(self.decode_sizes[-1], self.packed_seqs)
        rows = max(seqs, longest, *self.data_sizes, *self.packed_sizes)
        self.width = padded_width(-(-(max_context + rows) // cache.block_size) + 1)
        dev = decoder.device
        # ids, positions, slots and last rows share one int64 buffer, so they take one copy
        self._rows_i64 = torch.zeros(3 * rows + seqs, dtype=torch.int64, device=dev)
        self._dev = {
            **_int64_views(self._rows_i64, rows),
            "ctx": torch.ones(seqs, dtype=torch.int32, device=dev),
            "tables": torch.zeros(seqs, self.width, dtype=torch.int32, device=dev),
            "starts": torch.zeros(seqs + 1, dtype=torch.int32, device=dev),
        }
        self._host_i64 = torch.zeros_like(self._rows_i64, device="cpu").pin_memory()
        self._host = {
            **_int64_views(self._host_i64, rows),
            "ctx": torch.ones(seqs, dtype=torch.int32).pin_memory(),
            "tables": torch.zeros(seqs, self.width, dtype=torch.int32).pin_memory(),
            "starts": torch.zeros(seqs + 1, dtype=torch.int32).pin_memory(),
        }
        self._packed_host = torch.zeros(seqs * self.width, dtype=torch.int32).pin_memory()
        self._packed_dev = torch.zeros(seqs * self.width, dtype=torch.int32, device=dev)
        self._staging = StepStaging(
            StagingArrays(**{k: v.numpy() for k, v in self._host.items()}), cache.block_size
        )
        # the staging buffers may be refilled only once the last step's copies have read them
        self._copied = torch.cuda.Event()
        self._graphs: dict[Variant, torch.cuda.CUDAGraph] = {}
        self._packed: dict[int, torch.cuda.CUDAGraph] = {}  # by rows
        # replays by variant (packed steps by rows), and in all (one int: the metrics read it
        # from the event loop's thread while the worker may add a variant to the counter)
        self.replays: collections.Counter[Variant] = collections.Counter()
        self.packed_replays: collections.Counter[int] = collections.Counter()
        self.replayed = 0
        self._logits: dict[Shape, torch.Tensor] = {}  # the output of each shape's logits graph

    @property
    def shapes(self) -> list[Shape]:
        return [(1, n) for n in self.prefill_sizes] + [(b, 1) for b in self.decode_sizes]

    @property
    def variants(self) -> list[Variant]:
        data = self.prefill_sizes + self.data_sizes
        return [(s, True) for s in self.shapes] + [((1, n), False) for n in data]

    def capture(self, progress: bool = True) -> None:
        """Captures every variant; out of device memory, says which settings to lower."""
        try:
            self._capture(progress)
        except torch.cuda.OutOfMemoryError as exc:
            raise ConfigError(
                f"out of device memory capturing the CUDA graphs at start-up (up to "
                f"{self.decode_sizes[-1]} decode rows, {max(self.data_sizes, default=0)} data "
                "tokens); lower kv_memory_fraction (or kv_cache_tokens), graph_max_batch, "
                f"graph_max_data or graph_max_data_seqs, or set cuda_graphs: false: {exc}"
            ) from exc

    def _capture(self, progress: bool) -> None:
        pool = None
        # largest first, so the smaller graphs fit in the memory pool the first one sized
        variants = sorted(self.variants, key=lambda v: v[0][0] * v[0][1], reverse=True)
        total = len(variants) + len(self.packed_sizes)
        with torch.inference_mode(), Progress(total, "capturing CUDA graphs", enabled=progress) as bar:
            for shape, with_logits in variants:
                with _launch_mode(shape):
                    self._forward(*shape, with_logits)  # compiles and warms every kernel first
                    torch.cuda.synchronize(self.decoder.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._forward(*shape, with_logits)
                pool = graph.pool()
                self._graphs[(shape, with_logits)] = graph
                if logits is not None:
                    self._logits[shape] = logits
                bar.update(1)
            for rows in sorted(self.packed_sizes, reverse=True):
                self._packed[rows] = self._capture_packed(rows, pool)
                pool = self._packed[rows].pool()
                bar.update(1)

    def _capture_packed(self, rows: int, pool: object) -> torch.cuda.CUDAGraph:
        # a valid partition to capture over: every row in the first sequence, the rest empty
        self._dev["starts"][1:].fill_(rows)
        with _launch_mode((self.packed_seqs, rows)):
            self._forward_packed(rows)
            torch.cuda.synchronize(self.decoder.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward_packed(rows)
        return graph

    def drop_slow_data_sizes(self, repeats: int = 3) -> dict[int, float]:
        """Times each data-only graph past the question sizes (ms per replay) and drops those a
        larger one replays faster: cuBLAS's kernel choice is not monotone in the row count (on
        the H200, the MLP's up-projection took 0.27 ms at 448 rows and 0.16 ms at 480), so
        padding a chunk further can be the faster step. Returns the times measured."""
        times: dict[int, float] = {}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for n in self.data_sizes:
            graph = self._graphs[((1, n), False)]
            graph.replay()  # clocks up, caches warm
            start.record()
            for _ in range(repeats):
                graph.replay()
            end.record()
            end.synchronize()
            times[n] = start.elapsed_time(end) / repeats
        for n in slower_than_larger(times, SLOWER_MARGIN):
            del self._graphs[((1, n), False)]
            self.data_sizes.remove(n)
            if n in self._packed:  # the same GEMM shapes: packed steps skip the size too
                del self._packed[n]
                self.packed_sizes.remove(n)
        return times

    def packed_for(self, chunks: list[Chunk]) -> int | None:
        """The rows of the packed graph that can run this step of several sessions' data."""
        return pick_packed(chunks, self.packed_seqs, self.packed_sizes)

    def run_packed(self, chunks: list[Chunk], rows: int) -> None:
        """The step of several sessions' data, packed into ``rows`` rows, for its KV writes."""
        self._copied.synchronize()
        width = self._staging.fill_packed(chunks, self.packed_seqs, rows)
        self._upload(self.packed_seqs, width, None)
        self._dev["starts"].copy_(self._host["starts"], non_blocking=True)
        self._copied.record()
        self._packed[rows].replay()
        self.packed_replays[rows] += 1
        self.replayed += 1

    def shape_for(self, chunks: list[Chunk]) -> Shape | None:
        """The captured shape that can run this step, if any: a batch of decode tokens, one
        short chunk (a question, or a little session data), or one longer chunk of session
        data (its graph has no logits)."""
        return pick_shape(chunks, self.decode_sizes, self.prefill_sizes, self.data_sizes)

    def run(
        self, chunks: list[Chunk], shape: Shape, feed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [len(chunks), vocab] of each chunk's last token. ``feed``: the input ids of a
        decode step's rows, already on the device (they override the staged ones)."""
        self._replay(chunks, shape, feed, with_logits=True)
        return self._logits[shape][: len(chunks)]

    def run_without_logits(self, chunks: list[Chunk], shape: Shape) -> None:
        """The step of a prefill shape for its KV writes only (session data)."""
        self._replay(chunks, shape, None, with_logits=False)

    def _replay(
        self, chunks: list[Chunk], shape: Shape, feed: torch.Tensor | None, with_logits: bool
    ) -> None:
        self._copied.synchronize()
        width = self._staging.fill(chunks, *shape)
        self._upload(shape[0], width, feed)
        self._copied.record()
        self._graphs[(shape, with_logits)].replay()
        self.replays[(shape, with_logits)] += 1
        self.replayed += 1

    def _upload(self, seqs: int, width: int, feed: torch.Tensor | None) -> None:
        """The staged rows, contexts and tables to the graphs' device buffers."""
        self._rows_i64.copy_(self._host_i64, non_blocking=True)
        if feed is not None:
            self._dev["ids"][: feed.shape[0]].copy_(feed)
        self._dev["ctx"][:seqs].copy_(self._host["ctx"][:seqs], non_blocking=True)
        self._copy_tables(seqs, width)

    def _copy_tables(self, seqs: int, width: int) -> None:
        """The staged block tables' first ``width`` columns to the device. Several rows cut
        narrower than the buffer are not contiguous, and torch would copy such a slice
        through pageable memory; so they are packed into a pinned buffer on the host first,
        and spread to the table's stride by a device copy."""
        tables, staged = self._dev["tables"], self._host["tables"]
        if seqs == 1 or width == self.width:
            tables[:seqs, :width].copy_(staged[:seqs, :width], non_blocking=True)
            return
        cells = seqs * width
        packed = self._packed_host[:cells]
        packed.view(seqs, width).copy_(staged[:seqs, :width])
        self._packed_dev[:cells].copy_(packed, non_blocking=True)
        tables[:seqs, :width].copy_(self._packed_dev[:cells].view(seqs, width))

    def _forward(self, seqs: int, per_seq: int, with_logits: bool) -> torch.Tensor | None:
        d, rows = self._dev, seqs * per_seq
        meta = AttentionMeta(
            slot_mapping=d["slots"][:rows],
            query_starts=torch.arange(0, rows + 1, per_seq, dtype=torch.int32, device=d["ctx"].device),
            context_lens=d["ctx"][:seqs],
            block_tables=d["tables"][:seqs],
            query_starts_list=list(range(0, rows + 1, per_seq)),
            context_lens_list=[self.max_context] * seqs,  # sizes the kernels' grids for any context
            decode_only=per_seq == 1,
        )
        hidden = self.decoder(d["ids"][:rows], d["pos"][:rows], meta, self.cache.layers)
        if not with_logits:
            return None
        return self.decoder.logits(hidden.index_select(0, d["last"][:seqs])).float()


    def _forward_packed(self, rows: int) -> None:
        """A step of ``rows`` rows over ``packed_seqs`` sequences whose partition is read from
        the device (``starts``); planned as one long sequence, which sizes the attention's grid
        for any partition (its kernel finds each program's sequence on the device)."""
        d, seqs = self._dev, self.packed_seqs
        meta = AttentionMeta(
            slot_mapping=d["slots"][:rows],
            query_starts=d["starts"][: seqs + 1],
            context_lens=d["ctx"][:seqs],
            block_tables=d["tables"][:seqs],
            query_starts_list=[0] + [rows] * seqs,
            context_lens_list=[self.max_context] * seqs,
            decode_only=False,
        )
        self.decoder(d["ids"][:rows], d["pos"][:rows], meta, self.cache.layers)


def data_sizes(longest_question: int, max_data: int) -> list[int]:
    """The data-only graph sizes past the question graphs' longest, up to ``max_data``."""
    return [n for n in DATA_BUCKETS if longest_question < n <= max_data]


def slower_than_larger(ms_by_size: dict[int, float], margin: float) -> list[int]:
    """The sizes some larger size beats by more than ``margin`` (a fraction of their time)."""
    slower, best = [], float("inf")
    for n in sorted(ms_by_size, reverse=True):
        if best < ms_by_size[n] * (1 - margin):
            slower.append(n)
        best = min(best, ms_by_size[n])
    return sorted(slower)


def packed_sizes(max_data: int) -> list[int]:
    """Row counts of the packed graphs (several sessions' data in one step), up to max_data
    and PACKED_MAX_ROWS."""
    top = min(max_data, PACKED_MAX_ROWS)
    return [n for n in PREFILL_BUCKETS + DATA_BUCKETS if PACKED_MIN_ROWS <= n <= top]


def pick_packed(chunks: list[Chunk], packed_seqs: int, sizes: list[int]) -> int | None:
    """The fewest packed rows that hold a step of two or more sessions' data chunks, with a
    sequence to spare for the padding rows; None for anything else."""
    if len(chunks) < 2 or len(chunks) >= packed_seqs:
        return None
    if any(ch.sample or ch.score for ch in chunks):
        return None
    total = sum(ch.length for ch in chunks)
    return next((n for n in sizes if n >= total), None)


def pick_shape(
    chunks: list[Chunk], decode_sizes: list[int], prefill_sizes: list[int], data_sizes: list[int]
) -> Shape | None:
    """The smallest captured shape that holds the step: decode rows batch into (B, 1); one
    chunk into (1, L), where a question or a scoring chunk needs a graph with logits (the
    question sizes), and session data may also take a data-only size."""
    if all(ch.length == 1 and ch.sample for ch in chunks):
        return next(((b, 1) for b in decode_sizes if b >= len(chunks)), None)
    if len(chunks) != 1:
        return None
    (chunk,) = chunks
    sizes = prefill_sizes if chunk.sample or chunk.score else prefill_sizes + data_sizes
    return next(((1, n) for n in sizes if n >= chunk.length), None)


def _launch_mode(shape: Shape) -> contextlib.AbstractContextManager:
    """Graphs of several sequences are captured without programmatic dependent launch: on an
    H200 at Llama-3.1-8B shapes PDL cost 2-4% of the decode step from 8 sequences up (13.82
    against 13.24 ms at 64 x 4k keys), and nothing at one; one sequence's question steps keep
    it (6.27 against 6.43 ms at 19k). Their kernels compile a second time without it, once
    per Triton cache (about 20 s more on the H200's first start)."""
    if shape[0] == 1:
        return contextlib.nullcontext()
    try:
        from livelm.daemon.kernels.triton_backend import pdl
    except ImportError:  # no triton: no kernel of ours launches with PDL anyway
        return contextlib.nullcontext()
    return pdl.suspended()


def _int64_views(buffer: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    return {
        "ids": buffer[:rows],
        "pos": buffer[rows : 2 * rows],
        "slots": buffer[2 * rows : 3 * rows],
        "last": buffer[3 * rows :],
    }
