"""Decode attention's splits (paged_decode.py): one split writes its output directly, several
are merged by the combine kernel. Without CUDA the kernel runs on CPU tensors in Triton's
interpreter (imported as tests/triton_interpret.py arranges, small shapes); with CUDA the same
cases run compiled, and the last section checks Llama-3.1-8B shapes, repeatability and
CUDA-graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

from livelm.daemon.kernels import torch_ref
from livelm.daemon.kernels.attention_meta import AttentionMeta
from tests.triton_interpret import (
    CUDA,
    DEVICE,
    PoisonedTorch,
    import_kernels,
    interpreter_while_testing,
)

MODULE = "livelm.daemon.kernels.triton_backend.paged_decode"
pd = import_kernels([MODULE])[MODULE]
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pd, "torch", PoisonedTorch())


def _decode_batch(
    ctx_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta]:
    """One query row per sequence; cache blocks scrambled, every slot outside a context NaN."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(per_seq) + 1  # the last block: table padding
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype)
    v_cache = torch.full(shape, math.nan, dtype=dtype)
    order = torch.randperm(num_blocks - 1, generator=g)
    table = torch.full((len(ctx_lens), max(per_seq) + 2), num_blocks - 1, dtype=torch.int32)
    used = 0
    for b, ctx in enumerate(ctx_lens):
        blocks = order[used:used + per_seq[b]]
        used += per_seq[b]
        table[b, :per_seq[b]] = blocks.to(torch.int32)
        pos = torch.arange(ctx)
        flat = blocks[pos // block_size] * block_size + pos % block_size
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(
                ctx, num_kv_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMeta(
        slot_mapping=torch.zeros(len(ctx_lens), dtype=torch.int64, device=DEVICE),
        query_starts=torch.arange(len(ctx_lens) + 1, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        block_tables=table.to(DEVICE),
        query_starts_list=list(range(len(ctx_lens) + 1)),
        context_lens_list=list(ctx_lens),
        decode_only=True,
    )
    q = torch.randn(len(ctx_lens), num_heads, head_dim, generator=g).to(dtype)
    return q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours).all(), "an output element is not finite (never written?)"
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _decode(q, kc, vc, meta, window: int | None, splits: int | None) -> torch.Tensor:
    return pd.paged_decode_attention(q, kc, vc, meta, q.shape[-1] ** -0.5, window, splits)


# ---- small shapes (the interpreter on the CPU) ------------------------------------------------
# contexts of 0 keys, of fewer keys than one split's minimum tile, and of more than a
# split count of whole tiles: past-the-end splits write neutral stats and must merge to nothing
CONTEXTS = [0, 1, 23, 70, 150, 333]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 2, 5, 16])
def test_merge_matches_reference(splits: int, dtype: torch.dtype) -> None:
    q, kc, vc, meta = _decode_batch(CONTEXTS, 8, 2, 32, 16, dtype)
    ours = _decode(q, kc, vc, meta, None, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 32**-0.5, None)
    assert _rel(ours, ref) < TOL[dtype]
    assert not ours[0].any(), "a context of no keys attends to nothing: zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [2, 5])
def test_merge_with_sliding_window(splits: int, dtype: torch.dtype) -> None:
    q, kc, vc, meta = _decode_batch([3, 40, 200], 4, 1, 16, 8, dtype, seed=1)
    ours = _decode(q, kc, vc, meta, 50, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 16**-0.5, 50)
    assert _rel(ours, ref) < TOL[dtype]


def test_merge_of_chosen_splits_and_whole_group_heads() -> None:
    """The split count chosen from the batch, and a group of 8 query heads per kv head."""
    q, kc, vc, meta = _decode_batch([90, 17], 16, 2, 32, 16, torch.float32, seed=2)
    assert pd.choose_splits(2 * 2, 90, DEVICE) > 1
    ours = _decode(q, kc, vc, meta, None, None)
    assert _rel(ours, torch_ref.paged_attention(q, kc, vc, meta, 32**-0.5, None)) < 1e-4


def test_repeated_calls_are_bitwise_identical() -> None:
    q, kc, vc, meta = _decode_batch([150, 7, 64], 8, 2, 32, 16, torch.bfloat16, seed=3)
    first = _decode(q, kc, vc, meta, None, 5)
    for _ in range(2):
        assert torch.equal(_decode(q, kc, vc, meta, None, 5), first)


def test_fixed_splits_follow_device_lengths() -> None:
    """A fixed grid (a captured graph's) stays right as the lengths on the device change."""
    q, kc, vc, meta = _decode_batch([150, 150], 8, 2, 32, 16, torch.float32, seed=4)
    for lens in ([150, 0], [5, 150], [150, 150]):
        meta.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        meta.context_lens_list = lens
        ours = _decode(q, kc, vc, meta, None, 5)
        assert _rel(ours, torch_ref.paged_attention(q, kc, vc, meta, 32**-0.5, None)) < 1e-4


def test_empty_batch() -> None:
    q, kc, vc, meta = _decode_batch([4], 8, 2, 32, 16, torch.float32)
    assert _decode(q[:0], kc, vc, meta, None, 4).shape == (0, 8, 32)


# ---- on the GPU: Llama-3.1-8B shapes, concurrency, CUDA graphs --------------------------------
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
LLAMA = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)


def _llama_batch(ctx_lens: list[int], seed: int = 0):
    return _decode_batch(ctx_lens, **LLAMA, seed=seed)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 2, 5, 16, 64])
def test_gpu_llama_shapes(splits: int | None) -> None:
    ctx = [19_000, 0, 1, 100, 1000, 4096, 33, 2600]  # short ones end before most splits start
    q, kc, vc, meta = _llama_batch(ctx)
    ours = _decode(q, kc, vc, meta, None, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
    assert _rel(ours, ref) < 1e-2


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
def test_gpu_one_long_sequence_chosen_splits(window: int | None) -> None:
    q, kc, vc, meta = _llama_batch([19_000])
    assert pd.choose_splits(8, 19_000, DEVICE) > 16  # one sequence: many splits to fill the GPU
    ours = _decode(q, kc, vc, meta, window, None)
    assert _rel(ours, torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, window)) < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_gpu_merge_is_deterministic() -> None:
    q, kc, vc, meta = _llama_batch([19_000, 3000, 50, 8000], seed=1)
    first = _decode(q, kc, vc, meta, None, 64)
    for _ in range(50):
        assert torch.equal(_decode(q, kc, vc, meta, None, 64), first)


@needs_cuda
@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager() -> None:
    q, kc, vc, meta = _llama_batch([8000, 40, 3000, 700], seed=2)
    splits = pd.graph_splits(4, 8, DEVICE)
    _decode(q, kc, vc, meta, None, splits)  # compile uncaptured
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [pd.paged_decode_attention(q, kc, vc, meta, 128**-0.5, None, splits)
                for _ in range(3)]  # like layers, launched back to back (PDL on Hopper)
    for lens in ([8000, 40, 3000, 700], [100, 0, 3000, 350]):  # within the cache
        meta.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        meta.context_lens_list = lens
        graph.replay()
        torch.cuda.synchronize()
        eager = _decode(q, kc, vc, meta, None, splits)
        for out in outs:
            assert torch.equal(out, eager)
        assert _rel(eager, torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)) < 1e-2
