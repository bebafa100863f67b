"""Runs, before the daemon is ready, one eager step of every shape class the step path can meet,
so that no live step pays a kernel compilation.

Triton compiles a kernel once per combination of its compile-time parameters: tile sizes picked
from a chunk's row count, whether the keys are split across programs, the padded split count
(which follows the context length). A data chunk or question that meets a new combination mid-
stream would stall for a second or more. The steps here cover chunk lengths from one token to
the step budget over contexts from empty to the longest allowed. Every row reads and writes
only the pool's scratch block, so no session's KV is touched.
"""

from __future__ import annotations

import torch

from livelm.daemon.engine.block_pool import SCRATCH_BLOCK
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.runner import ModelRunner
from livelm.daemon.engine.sampling import SamplingParams
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.engine.sequence import Sequence
from livelm.daemon.model.decoder import LlamaDecoder
from livelm.daemon.progress import Progress
from livelm.protocol.errors import ConfigError

# lengths whose row counts (x the GQA group) fall in each tile class of a prefill kernel
SHORT_CHUNKS = (1, 2, 3, 5, 9, 17, 33, 65)
FIRST_CONTEXT = 256  # contexts double from here: each split count class is met once
DECODE_BATCH = 3  # decode rows of several sequences in one step
GREEDY = SamplingParams(max_tokens=1)


def warm_up_plan(max_batch_tokens: int, max_context: int) -> list[tuple[int, int, int]]:
    """(sequences, tokens per sequence, context before the step) of each warm-up step."""
    contexts, ctx = [0], FIRST_CONTEXT
    while ctx < max_context:
        contexts.append(ctx)
        ctx *= 2
    contexts.append(max(max_context - max(SHORT_CHUNKS), 0))  # the longest context's class
    plan = []
    for ctx in contexts:
        for length in SHORT_CHUNKS:
            if ctx + length <= max_context:
                plan.append((1, length, ctx))
        if ctx + 1 <= max_context:
            plan.append((DECODE_BATCH, 1, ctx))
    for length in (257, max_batch_tokens):  # long chunks, fresh and over a long context
        for ctx in (0, max_context - length):
            if length <= max_batch_tokens and 0 <= ctx and ctx + length <= max_context:
                plan.append((1, length, ctx))
    return sorted(set(plan))


def warm_up(
    decoder: LlamaDecoder,
    cache: KVCache,
    max_batch_tokens: int,
    max_context: int,
    progress: bool = True,
) -> int:
    """Runs the plan's steps eagerly; returns how many ran."""
    plan = warm_up_plan(max_batch_tokens, max_context)
    runner = ModelRunner(decoder, cache)  # no graphs: every step runs the eager path
    with Progress(len(plan), "compiling kernel variants", enabled=progress) as bar:
        for seqs, length, context in plan:
            try:
                _step(runner, seqs, length, context)
            except torch.cuda.OutOfMemoryError as exc:
                # the same step would fail mid-stream later: say so now, with the knobs
                raise ConfigError(
                    f"out of device memory running a {length}-token step over {context} tokens "
                    "of context at start-up; lower kv_memory_fraction (or kv_cache_tokens) "
                    f"or max_batch_tokens ({max_batch_tokens}): {exc}"
                ) from exc
            bar.update(1)
    return len(plan)  # each step ended on reading its sampled tokens: all of it has run


def _step(runner: ModelRunner, seqs: int, length: int, context: int) -> None:
    total = context + length
    blocks = -(-total // runner.cache.block_size)
    chunks = [
        Chunk(Sequence([0] * total, block_table=[SCRATCH_BLOCK] * blocks), context, length, True)
        for _ in range(seqs)
    ]
    runner.run(chunks, [GREEDY] * seqs, [None] * seqs)
