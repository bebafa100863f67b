"""The Triton kernels against the torch reference.

Without CUDA they run on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 must be set
when the kernels are decorated, so this module imports (or re-imports) them with it set, and
keeps it set only while its own tests run. With CUDA the same small cases run compiled, and the
last section checks the real Llama-3.1-8B shapes.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from livelm.daemon.kernels import torch_ref
from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.candidates import Target
from tests.paged_inputs import paged_batch as _paged_batch
from tests.triton_interpret import (
    CUDA,
    DEVICE,
    PoisonedTorch,
    import_kernels,
    interpret_env,
    interpreter_while_testing,
)

PACKAGE = "livelm.daemon.kernels.triton_backend"
MODULES = ("paged_decode", "paged_prefill", "norms", "rope", "swiglu", "block_copy")  # dependency order
K = types.SimpleNamespace(
    **{
        name.rsplit(".", 1)[1]: mod
        for name, mod in import_kernels([f"{PACKAGE}.{m}" for m in MODULES]).items()
    }
)
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poisoned = PoisonedTorch()
    for name in MODULES:
        monkeypatch.setattr(getattr(K, name), "torch", poisoned)


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours).all(), "an output element is not finite (never written?)"
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
# elementwise kernels round once per step like the reference; the interpreter truncates on its
# fp32 -> bf16 casts (the GPU rounds to nearest even), so it only meets the looser bound
POINTWISE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3 if CUDA else 1e-2}


# ---- paged attention inputs -------------------------------------------------------------------
def _matches_reference(kernel, q_lens: list[int], ctx_lens: list[int], case: tuple,
                       dtype: torch.dtype) -> None:
    """``kernel`` against the reference on a paged batch whose slots outside every context
    hold NaN; ``case`` is (heads, kv heads, head_dim, block_size, window, splits)."""
    hq, hk, d, bs, window, splits = case
    q, kc, vc, meta = _paged_batch(q_lens, ctx_lens, hq, hk, d, bs, dtype)
    ours = kernel(q, kc, vc, meta, d**-0.5, window, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, d**-0.5, window)
    assert _rel(ours, ref) < TOL[dtype]


PREFILL_CASES = [
    # q_lens, ctx_lens, heads, kv heads, head_dim, block_size, window, splits
    ([1, 7, 33], [1, 40, 90], 4, 4, 64, 16, None, None),
    ([5, 1, 20], [70, 33, 20], 8, 2, 128, 8, 24, 1),
    ([5, 1, 20], [70, 33, 20], 8, 2, 128, 8, 24, 3),
    ([17, 3], [17, 130], 8, 2, 64, 16, None, 4),
    ([40], [95], 4, 1, 64, 16, 30, None),
    ([10, 64, 1], [300, 200, 150], 8, 2, 64, 16, 150, 2),  # window with fully visible tiles
    ([150, 2], [160, 50], 2, 2, 64, 16, None, None),  # several query tiles per sequence
    ([40], [300], 4, 1, 64, 16, None, None),  # bf16: two 128-row tiles in a split launch
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"q{c[0]}-ctx{c[1]}-g{c[2] // c[3]}")
def test_prefill_attention_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    _matches_reference(K.paged_prefill.paged_prefill_attention, case[0], case[1], case[2:], dtype)


TMA_CASES = [  # 64-token blocks: a page is one key tile
    # q_lens, ctx_lens, heads, kv heads, head_dim, block_size, window, splits; TMA loads only
    # in unsplit launches, split ones load by pointer
    ([1, 7, 33], [1, 40, 90], 4, 4, 64, 64, None, 1),
    ([5, 1, 20], [70, 33, 200], 8, 2, 128, 64, 24, 3),
    ([40], [95], 4, 1, 64, 64, 30, 1),
    ([10, 64, 1], [300, 200, 150], 8, 2, 64, 64, 150, 2),  # window with fully visible tiles
    ([10, 64, 1], [300, 200, 150], 8, 2, 64, 64, 150, 1),
    ([150, 2], [160, 50], 2, 2, 64, 64, None, 1),  # several query tiles per sequence
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"q{c[0]}-ctx{c[1]}-g{c[2] // c[3]}-s{c[7]}")
def test_prefill_attention_with_tma_loads_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    """Pages past a context's end hold NaN, which the TMA loads must not let through."""
    _matches_reference(K.paged_prefill.paged_prefill_attention_tma, case[0], case[1], case[2:],
                       dtype)



@pytest.mark.parametrize("lazy", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_rescales_when_later_keys_dominate(
    lazy: bool, splits: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys of the later blocks score far above the earlier ones, so a row's maximum grows
    by far mid-walk (pointer-loaded launches, which rescale on every tile)."""
    monkeypatch.setattr(K.paged_prefill, "LAZY_RESCALE", lazy)
    q_lens, ctx_lens = [8, 3], [200, 150]
    q, kc, vc, meta = _paged_batch(q_lens, ctx_lens, 8, 2, 64, 16, torch.float32)
    for b, ctx in enumerate(ctx_lens):
        later = meta.block_tables[b, ctx // 16 // 2:-(-ctx // 16)].long()
        kc[later] *= 8.0
    ours = K.paged_prefill.paged_prefill_attention(q, kc, vc, meta, 64**-0.5, None, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 64**-0.5, None)
    assert _rel(ours, ref) < TOL[torch.float32]


@pytest.mark.parametrize("lazy", [True, False])
def test_tma_prefill_defers_rescaling_correctly(lazy: bool, monkeypatch: pytest.MonkeyPatch,
                                                ) -> None:
    """The deferred rescale's own launch (TMA loads, 128-row tiles: 32 queries x 4 heads).
    Keys past the third block are one shared direction (plus noise), scoring about 4 sigma
    times a row's alignment with it: rows well aligned see their maximum jump mid-walk (the
    rescaling branch), and the softmax over those keys stays flat, not a few-key spike that
    bf16 rounding would dominate."""
    monkeypatch.setattr(K.paged_prefill, "LAZY_RESCALE", lazy)
    torch.manual_seed(3)  # bf16 in the interpreter (truncating casts) sits near the bound
    q_lens, ctx_lens = [32, 20], [400, 330]
    q, kc, vc, meta = _paged_batch(q_lens, ctx_lens, 8, 2, 64, 64, torch.bfloat16)
    assert K.paged_prefill._plan(q, kc, meta)["block_m"] == 128
    direction = torch.nn.functional.normalize(torch.randn(64, device=kc.device), dim=0)
    for b, ctx in enumerate(ctx_lens):
        later = kc[meta.block_tables[b, 3:-(-ctx // 64)].long()]
        shared = 32.0 * direction + 0.5 * torch.randn(later.shape, device=kc.device)
        kc[meta.block_tables[b, 3:-(-ctx // 64)].long()] = torch.where(
            later.isnan(), later, shared.to(kc.dtype))
    ours = K.paged_prefill.paged_prefill_attention_tma(q, kc, vc, meta, 64**-0.5, None, 1)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 64**-0.5, None)
    assert _rel(ours, ref) < TOL[torch.bfloat16]

def test_tma_variants_refuse_other_block_sizes() -> None:
    q, kc, vc, meta = _paged_batch([1], [20], 4, 4, 64, 16, torch.float32)
    for variant in (K.paged_prefill.paged_prefill_attention_tma,
                    K.paged_decode.paged_decode_attention_tma):
        with pytest.raises(ValueError, match="64-token KV blocks"):
            variant(q, kc, vc, meta, 0.125, None)


DECODE_CASES = [
    # ctx_lens, heads, kv heads, head_dim, block_size, window, splits
    ([1, 17, 64, 100, 250], 4, 4, 64, 16, None, None),
    ([1, 17, 64, 100, 250], 8, 2, 128, 8, None, 3),
    ([9, 200, 31], 8, 2, 64, 16, 50, 8),
    ([300], 8, 2, 64, 16, None, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"ctx{c[0]}-g{c[1] // c[2]}-s{c[6]}")
def test_decode_attention_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    _matches_reference(K.paged_decode.paged_decode_attention, [1] * len(case[0]), case[0],
                       case[1:], dtype)


TMA_DECODE_CASES = [  # 64-token blocks; windows start mid-page
    # ctx_lens, heads, kv heads, head_dim, block_size, window, splits
    ([1, 17, 64, 100, 250], 4, 4, 64, 64, None, None),
    ([1, 65, 130, 250], 8, 2, 128, 64, None, 3),
    ([9, 200, 131], 8, 2, 64, 64, 50, 8),
    ([300], 8, 2, 64, 64, 100, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TMA_DECODE_CASES,
                         ids=lambda c: f"ctx{c[0]}-g{c[1] // c[2]}-w{c[5]}-s{c[6]}")
def test_decode_attention_with_tma_loads_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    _matches_reference(K.paged_decode.paged_decode_attention_tma, [1] * len(case[0]), case[0],
                       case[1:], dtype)


def test_decode_fixed_splits_follow_device_lengths() -> None:
    """A fixed grid (as captured in a graph) stays right when the lengths on the device change."""
    q, kc, vc, meta = _paged_batch([1, 1], [150, 150], 8, 2, 64, 16, torch.float32)
    for lens in ([150, 3], [40, 150]):
        meta.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        meta.context_lens_list = lens
        ours = K.paged_decode.paged_decode_attention(q, kc, vc, meta, 0.125, None, num_splits=4)
        ref = torch_ref.paged_attention(q, kc, vc, meta, 0.125, None)
        assert _rel(ours, ref) < 1e-4


def test_prefill_needs_only_the_batch_shape_from_the_host() -> None:
    """Replayed in a graph, the host lists are the capture's: only N and B may be relied on."""
    q, kc, vc, meta = _paged_batch([15, 6], [15, 100], 8, 2, 64, 16, torch.float32)
    stale = AttentionMeta(meta.slot_mapping, meta.query_starts, meta.context_lens,
                          meta.block_tables, [0, 1, 21], [50, 70], False)
    ours = K.paged_prefill.paged_prefill_attention(q, kc, vc, stale, 0.125, None)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 0.125, None)
    assert _rel(ours, ref) < 1e-4


@pytest.mark.parametrize("splits", [None, 3])
def test_prefill_walking_the_longest_tiles_first_matches_the_reference(
    splits: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(K.paged_prefill, "LONGEST_FIRST", True)
    _matches_reference(K.paged_prefill.paged_prefill_attention, [150, 2, 40], [160, 50, 300],
                       (8, 2, 64, 16, None, splits), torch.float32)


@pytest.mark.parametrize("plan", ["one-long", "even"])
def test_prefill_serves_any_partition_of_its_rows(plan: str) -> None:
    """A data graph of several sessions is captured for N rows over B sequences and replayed
    with the rows cut among fewer real sequences, then the padding rows' own sequence, then
    empty ones: only the device's query_starts may say which rows belong where."""
    q_lens, ctx_lens = [15, 6, 30, 9, 0, 0], [15, 100, 60, 9, 0, 0]  # the last real one: padding
    q, kc, vc, meta = _paged_batch(q_lens, ctx_lens, 8, 2, 64, 16, torch.float32)
    n, b = q.shape[0], len(q_lens)
    starts = [0] + [n] * b if plan == "one-long" else [min(n, i * -(-n // b)) for i in range(b + 1)]
    captured = AttentionMeta(meta.slot_mapping, meta.query_starts, meta.context_lens,
                             meta.block_tables, starts, [4096] * b, False)
    ours = K.paged_prefill.paged_prefill_attention(q, kc, vc, captured, 0.125, None)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 0.125, None)
    assert _rel(ours, ref) < 1e-4


def test_decode_splits_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    pd, cuda = K.paged_decode, torch.device("cuda")
    monkeypatch.setattr(pd, "sm_count", lambda device: 132)
    assert pd.choose_splits(8, 19_000, cuda) == 33  # one sequence: 2 programs on 132 SMs
    assert pd.choose_splits(64 * 8, 4096, cuda) == 1  # 64 sequences fill it already
    assert pd.choose_splits(16 * 8, 4096, cuda) == 2  # one wave: 2 programs on 132 SMs
    assert pd.choose_splits(8, 300, cuda) == -(-300 // pd.MIN_KEYS_PER_SPLIT)  # no tiny splits
    assert pd.choose_splits(8, 0, cuda) == 1


def test_prefill_plan_takes_wide_tiles_only_in_split_launches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk of a few row tiles over a long context (split over keys) takes the widest tile,
    so the KV is read by fewer tiles; a chunk whose narrower tiles fill the GPU keeps them."""
    monkeypatch.setattr(K.paged_decode, "sm_count", lambda device: 132)
    k_cache = torch.empty(1, 64, 8, 128, dtype=torch.bfloat16)

    def plan(q_len: int, ctx: int) -> dict[str, int]:
        q = torch.empty(q_len, 32, 128, dtype=torch.bfloat16)
        meta = AttentionMeta(torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0),
                             [0, q_len], [ctx], False)
        return K.paged_prefill._plan(q, k_cache, meta)

    record = plan(51, 34_000)  # 204 rows: two 128-row tiles per kv head, not four of 64
    assert (record["block_m"], record["block_q"]) == (128, 32) and record["splits"] > 1
    question = plan(32, 19_000)  # 8 programs of 128 rows, one per SM: 16 splits, one wave
    assert question["block_m"] == 128 and question["splits"] * 8 <= 132 < question["splits"] * 9
    assert record["splits"] * 16 <= 132
    for q_len in (512, 2048):  # 64-row tiles fill the GPU without splitting
        chunk = plan(q_len, 32_768)
        assert chunk["block_m"] == 64 and chunk["splits"] == 1


# ---- norms, rope, swiglu ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    x = torch.randn(7, 96, device=DEVICE).to(dtype)
    w = torch.randn(96, device=DEVICE).to(dtype)
    assert _rel(K.norms.rms_norm(x, w, 1e-5), torch_ref.rms_norm(x, w, 1e-5)) < POINTWISE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_over_heads_of_a_strided_view(dtype: torch.dtype) -> None:
    fused = torch.randn(5, 3 * 4 * 32, device=DEVICE).to(dtype)
    q = fused[:, 32:32 + 4 * 32].view(5, 4, 32)  # like q cut out of a qkv projection
    w = torch.randn(32, device=DEVICE).to(dtype)
    assert _rel(K.norms.rms_norm(q, w, 1e-6), torch_ref.rms_norm(q, w, 1e-6)) < POINTWISE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 200, device=DEVICE).to(dtype)
    residual = torch.randn(2, 3, 200, device=DEVICE).to(dtype)
    w = torch.randn(200, device=DEVICE).to(dtype)
    normed, summed = K.norms.add_rms_norm(x, residual, w, 1e-5)
    ref_normed, ref_summed = torch_ref.add_rms_norm(x, residual, w, 1e-5)
    if CUDA or dtype == torch.float32:
        assert torch.equal(summed, ref_summed)
    assert _rel(summed, ref_summed) < POINTWISE_TOL[dtype]
    assert _rel(normed, ref_normed) < POINTWISE_TOL[dtype]


def _cos_sin(max_pos: int, dim: int) -> torch.Tensor:
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim)
    freqs = torch.arange(max_pos, device=DEVICE).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 64), (8, 2, 128), (6, 2, 96)])
def test_rope_matches_reference(dtype: torch.dtype, hq: int, hk: int, d: int) -> None:
    n = 9
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
    positions = torch.randperm(300, device=DEVICE)[:n]
    table = _cos_sin(300, d)
    q_out, k_out = K.rope.rope(q, k, positions, table)
    q_ref, k_ref = torch_ref.rope(q, k, positions, table)
    assert _rel(q_out, q_ref) < POINTWISE_TOL[dtype]
    assert _rel(k_out, k_ref) < POINTWISE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d,block", [(4, 4, 64, 4), (8, 2, 128, 16)])
def test_rope_store_kv_writes_slots_like_reference(
    dtype: torch.dtype, hq: int, hk: int, d: int, block: int
) -> None:
    n, blocks = 9, 8
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
    v = qkv[:, (hq + hk) * d :].view(n, hk, d)
    positions = torch.randperm(300, device=DEVICE)[:n]
    slots = torch.randperm(blocks * block, device=DEVICE)[:n]
    table = _cos_sin(300, d)
    caches = [torch.randn(blocks, block, hk, d, device=DEVICE).to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q_out = K.rope.rope_store_kv(q, k, v, positions, table, *caches, slots)
    q_ref = torch_ref.rope_store_kv(q, k, v, positions, table, *ref_caches, slots)
    assert _rel(q_out, q_ref) < POINTWISE_TOL[dtype]
    assert _rel(caches[0], ref_caches[0]) < POINTWISE_TOL[dtype]
    assert torch.equal(caches[1], ref_caches[1])  # v is copied, not computed
    untouched = torch.ones(blocks * block, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    k_flat, k_ref_flat = caches[0].view(-1, hk, d), ref_caches[0].view(-1, hk, d)
    assert torch.equal(k_flat[untouched], k_ref_flat[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 2 * 1500), (2, 3, 2 * 40)])
def test_swiglu_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (3 * torch.randn(*shape, device=DEVICE)).to(dtype)
    assert _rel(K.swiglu.swiglu(x), torch_ref.swiglu(x)) < POINTWISE_TOL[dtype]


# ---- KV block copies --------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [4, 128])  # a block of 128 elements, and of one whole chunk
@pytest.mark.parametrize("pairs", [[(4, 7)], [(8, 1), (2, 5), (0, 6)]])
def test_block_copies_match_the_reference(block_size: int, pairs: list[tuple[int, int]]) -> None:
    g = torch.Generator().manual_seed(block_size)
    pool = torch.randn(3, 2, 9, block_size, 2, 16, generator=g).to(DEVICE)
    expected = pool.clone()
    torch_ref.copy_kv_blocks(expected, pairs)
    assert not torch.equal(expected, pool)  # the case copies something
    for src, dst in pairs:
        assert torch.equal(expected[:, :, dst], pool[:, :, src])
    K.block_copy.copy_blocks(pool, pairs)
    assert torch.equal(pool, expected)


def test_block_copy_refuses_bad_pairs() -> None:
    pool = torch.zeros(2, 2, 3, 4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="outside the pool"):
        K.block_copy.copy_blocks(pool, [(0, 3)])
    with pytest.raises(ValueError, match="contiguous"):
        K.block_copy.copy_blocks(pool.transpose(0, 1), [(0, 1)])


# ---- candidates -------------------------------------------------------------------------------
def _target(**overrides: object) -> Target:
    fields = dict(device=DEVICE, capability=(9, 0) if CUDA else None, dtype=torch.bfloat16,
                  num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096, block_size=16,
                  sliding_window=None, vocab_size=128256)
    fields.update(overrides)
    return Target(**fields)


def test_candidates_cover_each_operation_and_explain_refusals() -> None:
    from livelm.daemon.kernels.triton_backend import candidates

    every = candidates()
    tma = [c for c in every if c.name.endswith("_tma")]
    gluon = [c for c in every if "_gluon" in c.name]
    found = {c.operation: c for c in every if c not in tma and c not in gluon}
    assert set(found) == {"prefill_attention", "decode_attention", "rms_norm", "add_rms_norm",
                          "rope", "rope_store_kv", "swiglu", "linear", "swiglu_linear",
                          "copy_kv_blocks"}
    assert all(c.backend == "triton" and c.supports(_target()) is None for c in found.values())
    assert {c.operation for c in tma} == {"prefill_attention", "decode_attention"}
    assert [c.operation for c in gluon] == ["prefill_attention"] * 2
    if not CUDA:  # Gluon has no interpreter: refused, with the reason
        assert all("CUDA device only" in c.supports(_target(block_size=64)) for c in gluon)
    for c in tma:
        assert "64-token" in c.supports(_target())  # 16-token blocks: the pointer kernels only
        assert c.supports(_target(block_size=64)) is None
        if CUDA:
            assert "9.0" in c.supports(_target(block_size=64, capability=(8, 0)))
    decode = found["decode_attention"].supports
    assert "head_dim" in decode(_target(head_dim=96))
    assert "dtype" in decode(_target(dtype=torch.float64))
    assert "block_size" in decode(_target(block_size=12))
    with interpret_env(False):
        os.environ.pop("TRITON_INTERPRET", None)
        assert "CUDA" in decode(_target(device=torch.device("cpu"), capability=None))


def test_package_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from livelm.daemon.kernels import triton_backend
    from livelm.daemon.kernels.candidates import BackendUnavailable

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(BackendUnavailable, match="triton is not installed"):
        triton_backend.candidates()


# ---- real Llama-3.1-8B shapes on the GPU ------------------------------------------------------
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
LLAMA = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)


def _llama_batch(q_lens: list[int], ctx_lens: list[int]):
    c = LLAMA
    return _paged_batch(q_lens, ctx_lens, c["num_heads"], c["num_kv_heads"], c["head_dim"],
                        c["block_size"], c["dtype"])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
def test_gpu_question_over_long_contexts(window: int | None) -> None:
    q, kc, vc, meta = _llama_batch([32, 32, 32, 51], [2600, 19_000, 32_768, 34_000])
    ours = K.paged_prefill.paged_prefill_attention(q, kc, vc, meta, 128**-0.5, window)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, window)
    assert _rel(ours, ref) < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_gpu_tma_attention_at_model_shapes() -> None:
    c = LLAMA
    for q_lens, ctx_lens in (([32, 32, 48], [2600, 19_000, 32_768]), ([2048, 1], [8192, 300]),
                             ([32] * 64, [4096] * 64)):
        q, kc, vc, meta = _paged_batch(q_lens, ctx_lens, c["num_heads"], c["num_kv_heads"],
                                       c["head_dim"], 64, c["dtype"])
        ours = K.paged_prefill.paged_prefill_attention_tma(q, kc, vc, meta, 128**-0.5, None)
        ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
        assert _rel(ours, ref) < 1e-2
    q, kc, vc, meta = _paged_batch([1] * 64, [4096] * 63 + [19_000], c["num_heads"],
                                   c["num_kv_heads"], c["head_dim"], 64, c["dtype"])
    ours = K.paged_decode.paged_decode_attention_tma(q, kc, vc, meta, 128**-0.5, None)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
    assert _rel(ours, ref) < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_gpu_ingest_chunk() -> None:
    q, kc, vc, meta = _llama_batch([2048, 1, 300], [8192, 4000, 300])
    ours = K.paged_prefill.paged_prefill_attention(q, kc, vc, meta, 128**-0.5, None)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
    assert _rel(ours, ref) < 1e-2


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 16])
def test_gpu_decode_batch(splits: int | None) -> None:
    ctx = [4096 - 37 * i for i in range(64)]
    q, kc, vc, meta = _llama_batch([1] * 64, ctx)
    ours = K.paged_decode.paged_decode_attention(q, kc, vc, meta, 128**-0.5, None, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
    assert _rel(ours, ref) < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_gpu_decode_long_contexts() -> None:
    q, kc, vc, meta = _llama_batch([1, 1, 1], [2600, 19_000, 32_768])
    ours = K.paged_decode.paged_decode_attention(q, kc, vc, meta, 128**-0.5, None)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
    assert _rel(ours, ref) < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_gpu_pointwise_kernels_at_model_shapes() -> None:
    n, dt = 2048, torch.bfloat16
    x = torch.randn(n, 4096, device=DEVICE, dtype=dt)
    res = torch.randn(n, 4096, device=DEVICE, dtype=dt)
    w = torch.randn(4096, device=DEVICE, dtype=dt)
    assert _rel(K.norms.rms_norm(x, w, 1e-5), torch_ref.rms_norm(x, w, 1e-5)) < 1e-3
    normed, summed = K.norms.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, torch_ref.add_rms_norm(x, res, w, 1e-5)[1])
    assert _rel(normed, torch_ref.add_rms_norm(x, res, w, 1e-5)[0]) < 1e-3
    qkv = torch.randn(n, 48 * 128, device=DEVICE, dtype=dt)
    q, k = qkv[:, : 32 * 128].view(n, 32, 128), qkv[:, 32 * 128 : 40 * 128].view(n, 8, 128)
    positions = torch.arange(5000, 5000 + n, device=DEVICE)
    table = _cos_sin(131072, 128)
    for ours, ref in zip(K.rope.rope(q, k, positions, table),
                         torch_ref.rope(q, k, positions, table), strict=True):
        assert _rel(ours, ref) < 1e-3
    gate_up = torch.randn(n, 2 * 14336, device=DEVICE, dtype=dt)
    assert _rel(K.swiglu.swiglu(gate_up), torch_ref.swiglu(gate_up)) < 1e-3


@needs_cuda
@pytest.mark.gpu
def test_gpu_block_copy_over_a_pool_past_32_bit_offsets() -> None:
    """A pool of 2.5G elements (Llama-3.1-8B's layers and heads, 64-token blocks): offsets
    past 2^31, where the planes of the copied blocks lie far apart."""
    pool = torch.empty(32, 2, 600, 64, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert pool.numel() > 2**31
    for pairs in ([(3, 580)], [(599, 0), (150, 151), (7, 300)]):
        for src, _ in pairs:
            pool[:, :, src].normal_()
        K.block_copy.copy_blocks(pool, pairs)
        torch.cuda.synchronize()
        for src, dst in pairs:
            assert torch.equal(pool[:, :, dst], pool[:, :, src])
