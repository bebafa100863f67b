"""Timing candidates on the model's real shapes, and the on-disk cache of those timings.

Timings use CUDA events after a warm-up and report the median. They are cached as JSON under
``<cache_dir>/kernels/``, keyed by GPU name, torch (and triton, livelm) version and the target's
shape, so the next start with the same key reuses them instead of timing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from livelm.daemon.kernels.candidates import Candidate, Target
from livelm.daemon.kernels.checking import attention_inputs
from livelm.daemon.kernels.ops import SamplingBatch
from livelm.daemon.logs import get_logger

log = get_logger(__name__)

Timer = Callable[[Candidate], float]  # milliseconds for one call on the real shapes
Timings = dict[str, dict[str, float]]  # operation -> candidate name -> milliseconds

WARMUP = 3
REPEATS = 20
TOKENS = 2048  # a prefill step's token budget
QUESTION_ROWS = 32  # a short question's rows, where the projections read more than they compute
LAYERS = 32  # layers of the pool a block copy spans
DECODE_SEQS, DECODE_CONTEXT = 32, 4096
PREFILL_SEQS = [(1024, 8192), (1024, 1024)]  # (new tokens, context)
SAMPLE_ROWS = 64


def cuda_timer(target: Target, ffn_size: int | None) -> Timer:
    """Times a candidate with CUDA events on inputs of the model's real shapes (made once per op)."""
    inputs: dict[str, tuple[Any, ...]] = {}

    def time(candidate: Candidate) -> float:
        op = candidate.operation
        if op not in inputs:
            inputs[op] = _workload(op, target, ffn_size)
        return _median_ms(candidate.fn, inputs[op])

    return time


def _median_ms(fn: Callable, args: tuple[Any, ...]) -> float:
    for _ in range(WARMUP):
        fn(*args)
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _workload(op: str, t: Target, ffn_size: int | None) -> tuple[Any, ...]:
    gen = torch.Generator(device=t.device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=t.device, dtype=t.dtype)

    if op == "rms_norm":
        return randn(TOKENS, t.hidden_size), randn(t.hidden_size), 1e-5
    if op == "add_rms_norm":
        return randn(TOKENS, t.hidden_size), randn(TOKENS, t.hidden_size), randn(t.hidden_size), 1e-5
    if op == "rope":
        positions = torch.arange(TOKENS, device=t.device)
        table = torch.randn(TOKENS, 2, t.head_dim, generator=gen, device=t.device)
        return randn(TOKENS, t.num_heads, t.head_dim), randn(TOKENS, t.num_kv_heads, t.head_dim), positions, table
    if op == "rope_store_kv":
        positions = torch.arange(TOKENS, device=t.device)
        table = torch.randn(TOKENS, 2, t.head_dim, generator=gen, device=t.device)
        blocks = -(-TOKENS // t.block_size) + 1
        k_cache = randn(blocks, t.block_size, t.num_kv_heads, t.head_dim)
        slots = torch.arange(TOKENS, device=t.device) + t.block_size  # past the scratch block
        return (randn(TOKENS, t.num_heads, t.head_dim), randn(TOKENS, t.num_kv_heads, t.head_dim),
                randn(TOKENS, t.num_kv_heads, t.head_dim), positions, table, k_cache,
                torch.empty_like(k_cache), slots)
    ffn = ffn_size or t.intermediate_size or 4 * t.hidden_size
    if op == "swiglu":
        return (randn(TOKENS, 2 * ffn),)
    if op == "linear":  # the o projection of a 32-token question: bound by reading the weight
        return randn(QUESTION_ROWS, t.num_heads * t.head_dim), randn(t.hidden_size, t.num_heads * t.head_dim)
    if op == "swiglu_linear":  # the down projection of a 32-token question, likewise
        return randn(QUESTION_ROWS, 2 * ffn), randn(t.hidden_size, ffn)
    if op == "sample":
        return _sample_workload(t, randn(SAMPLE_ROWS, t.vocab_size))
    if op == "copy_kv_blocks":  # a question's fork: one partial block, every layer
        pool = randn(LAYERS, 2, 8, t.block_size, t.num_kv_heads, t.head_dim)
        return pool, [(1, 5)]
    decode = op == "decode_attention"
    seqs = [(1, DECODE_CONTEXT)] * DECODE_SEQS if decode else PREFILL_SEQS
    q, k, v, meta = attention_inputs(t, gen, seqs, decode)
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0)
    return q, k, v, meta, t.head_dim**-0.5, t.sliding_window


def _sample_workload(t: Target, logits: torch.Tensor) -> tuple[Any, ...]:
    rows = logits.shape[0]
    hot = torch.arange(rows, device=t.device) % 2 == 1  # half greedy, half top-k/top-p
    params = SamplingBatch(
        temperature=hot.float() * 0.8,
        top_p=torch.full((rows,), 0.95, device=t.device),
        top_k=torch.full((rows,), 50, dtype=torch.int64, device=t.device),
        generators=[torch.Generator(device=t.device).manual_seed(i) for i in range(rows)],
        all_greedy=False,
    )
    return logits, params


# --- the cache -------------------------------------------------------------------------------


def cache_key(target: Target, ffn_size: int | None) -> dict[str, Any]:
    device = target.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "livelm": _version("livelm"),
        "dtype": str(target.dtype).removeprefix("torch."),
        "num_heads": target.num_heads,
        "num_kv_heads": target.num_kv_heads,
        "head_dim": target.head_dim,
        "hidden_size": target.hidden_size,
        "ffn_size": ffn_size,
        "block_size": target.block_size,
        "sliding_window": target.sliding_window,
        "vocab_size": target.vocab_size,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "kernels" / f"timings-{digest}.json"


def load_timings(path: Path, key: dict[str, Any]) -> Timings:
    """The cached timings for ``key``; an unreadable or foreign file counts as none (logged)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring the unreadable kernel timing cache %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not _valid(data.get("timings_ms")):
        log.warning("ignoring the kernel timing cache %s: it was written for another key", path)
        return {}
    return data["timings_ms"]


def _valid(timings: Any) -> bool:
    return isinstance(timings, dict) and all(
        isinstance(per_op, dict)
        and all(isinstance(ms, int | float) and ms >= 0 for ms in per_op.values())
        for per_op in timings.values()
    )


def save_timings(path: Path, key: dict[str, Any], timings: Timings) -> None:
    """Write atomically; a cache that cannot be written is logged and skipped."""
    body = json.dumps({"key": key, "timings_ms": timings}, indent=2, sort_keys=True)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".timings-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the kernel timing cache %s: %s", path, exc)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
