"""The dispatcher's numerical check: each candidate against the reference on fresh random inputs.

Inputs use the target's real head counts, head_dim, hidden size, vocabulary and dtype. The
attention inputs are a paged cache with scrambled block tables (one block shared by two
sequences), a mixed batch (decode rows, chunks over cached context, fresh prefills, block-aligned
ends), and NaN in every slot outside a context: a kernel must not let any of them leak in. On
CUDA the allocator is also primed with NaN so that rows a kernel forgets to write show up, and
the attention checks add one case of real size (the prefill shape that broke cuDNN's SDPA on the
H200). The reference runs in float32; a candidate passes when its relative error norm is within
the dtype's tolerance and it returns no NaN or inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from livelm.daemon.kernels import torch_ref
from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.candidates import Target
from livelm.daemon.kernels.ops import SamplingBatch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
ROWS = 7  # token rows of the elementwise checks: odd, not a power of two
ROPE_POSITIONS = 4096

Verify = Callable[[Any], str | None]  # the kernel's output -> why it is wrong, or None


@dataclass(frozen=True)
class Case:
    label: str
    args: tuple[Any, ...]
    verify: Verify  # gets the output, or (output, *written arguments) when ``writes`` is set
    writes: tuple[int, ...] = ()  # arguments the operation is meant to write into


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 2e-2)


def run_case(fn: Callable, case: Case) -> str | None:
    """Why ``fn`` fails ``case`` (it raised, mutated an input or missed), or None if it passed."""
    args = tuple(_clone(a) for a in case.args)
    _prime_allocator(case.args)
    try:
        out = fn(*args)
    except Exception as exc:  # any failure of a foreign kernel is a refusal, shown with its cause
        return f"{case.label}: raised {type(exc).__name__}: {_first_line(exc)}"
    if _device_of(case.args).type == "cuda":
        torch.cuda.synchronize()
    for i, (before, after) in enumerate(zip(case.args, args, strict=True)):
        if i not in case.writes and isinstance(before, torch.Tensor) and not _same(before, after):
            return f"{case.label}: modified its input argument {i}"
    reason = case.verify((out, *(args[i] for i in case.writes)) if case.writes else out)
    return None if reason is None else f"{case.label}: {reason}"


def check(fn: Callable, cases: Sequence[Case]) -> str | None:
    for case in cases:
        reason = run_case(fn, case)
        if reason is not None:
            return reason
    return None


def build_cases(op: str, target: Target, gen: torch.Generator, real_size: bool) -> list[Case]:
    if op in ("prefill_attention", "decode_attention"):
        return _attention_cases(target, gen, decode=op == "decode_attention", real_size=real_size)
    return _BUILDERS[op](target, gen)


# --- comparison ------------------------------------------------------------------------------


def close(got: Any, expected: torch.Tensor, dtype: torch.dtype) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, not a tensor"
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if got.dtype != dtype:
        return f"dtype {got.dtype}, expected {dtype}"
    if got.device != expected.device:
        return f"on {got.device}, expected {expected.device}"
    value = got.float()
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        return f"{bad} NaN/inf values in the output"
    error = float((value - expected).norm() / expected.norm().clamp_min(1e-30))
    limit = tolerance(dtype)
    if not error <= limit:
        return f"relative error {error:.2e} exceeds {limit:.0e}"
    return None


def _close_all(expected: tuple[torch.Tensor, ...], dtype: torch.dtype) -> Verify:
    def verify(got: Any) -> str | None:
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            return f"returned {type(got).__name__}, expected a tuple of {len(expected)} tensors"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            reason = close(g, e, dtype)
            if reason is not None:
                return f"output {i}: {reason}"
        return None

    return verify


def _close_one(expected: torch.Tensor, dtype: torch.dtype) -> Verify:
    return lambda got: close(got, expected, dtype)


# --- elementwise operations ------------------------------------------------------------------


def _randn(gen: torch.Generator, target: Target, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=target.device, dtype=dtype or target.dtype)


def _rms_norm_cases(target: Target, gen: torch.Generator) -> list[Case]:
    t, dt = target, target.dtype
    x = _randn(gen, t, ROWS, t.hidden_size)
    w = _randn(gen, t, t.hidden_size)
    # the q/k-norm path normalizes a strided [N, H, D] view of the fused qkv projection
    qkv = _randn(gen, t, ROWS, (t.num_heads + 2 * t.num_kv_heads) * t.head_dim)
    q = qkv[:, : t.num_heads * t.head_dim].view(ROWS, t.num_heads, t.head_dim)
    wq = _randn(gen, t, t.head_dim)
    eps = 1e-5
    return [
        Case("hidden rows", (x, w, eps), _close_one(torch_ref.rms_norm(x.float(), w.float(), eps), dt)),
        Case("strided heads", (q, wq, eps), _close_one(torch_ref.rms_norm(q.float(), wq.float(), eps), dt)),
    ]


def _add_rms_norm_cases(target: Target, gen: torch.Generator) -> list[Case]:
    t = target
    x, res = _randn(gen, t, ROWS, t.hidden_size), _randn(gen, t, ROWS, t.hidden_size)
    w = _randn(gen, t, t.hidden_size)
    expected = torch_ref.add_rms_norm(x.float(), res.float(), w.float(), 1e-5)
    return [Case("hidden rows", (x, res, w, 1e-5), _close_all(expected, t.dtype))]


def _rope_cases(target: Target, gen: torch.Generator) -> list[Case]:
    t = target
    q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    qkv = _randn(gen, t, ROWS, q_size + 2 * kv_size)
    q = qkv[:, :q_size].view(ROWS, t.num_heads, t.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(ROWS, t.num_kv_heads, t.head_dim)
    positions = torch.randint(ROPE_POSITIONS, (ROWS,), generator=gen, device=t.device)
    cos_sin = _cos_sin(t.head_dim, t.device)
    expected = torch_ref.rope(q.float(), k.float(), positions, cos_sin)
    return [Case("strided q/k", (q, k, positions, cos_sin), _close_all(expected, t.dtype))]


def _rope_store_kv_cases(target: Target, gen: torch.Generator) -> list[Case]:
    """Strided q/k/v views of a fused projection; caches full of NaN except the written slots,
    which must then hold the reference's k and v (other slots stay untouched)."""
    t = target
    q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    qkv = _randn(gen, t, ROWS, q_size + 2 * kv_size)
    q = qkv[:, :q_size].view(ROWS, t.num_heads, t.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(ROWS, t.num_kv_heads, t.head_dim)
    v = qkv[:, q_size + kv_size :].view(ROWS, t.num_kv_heads, t.head_dim)
    positions = torch.randint(ROPE_POSITIONS, (ROWS,), generator=gen, device=t.device)
    cos_sin = _cos_sin(t.head_dim, t.device)
    blocks = 2 * (-(-ROWS // t.block_size)) + 1
    shape = (blocks, t.block_size, t.num_kv_heads, t.head_dim)
    k_cache = torch.full(shape, float("nan"), device=t.device, dtype=t.dtype)
    v_cache = torch.full(shape, float("nan"), device=t.device, dtype=t.dtype)
    slots = torch.randperm(blocks * t.block_size, generator=gen, device=t.device)[:ROWS]
    q_ref, k_ref = torch_ref.rope(q.float(), k.float(), positions, cos_sin)
    args = (q, k, v, positions, cos_sin, k_cache, v_cache, slots)

    def verify(got: Any) -> str | None:
        q_out, k_written, v_written = got
        rest = torch.ones(blocks * t.block_size, dtype=torch.bool, device=t.device)
        rest[slots] = False
        for label, cache in (("k_cache", k_written), ("v_cache", v_written)):
            if not bool(cache.view(-1, t.num_kv_heads, t.head_dim)[rest].isnan().all()):
                return f"{label}: wrote outside the given slots"
        checks = ((q_out, q_ref), (k_written.view(-1, t.num_kv_heads, t.head_dim)[slots], k_ref),
                  (v_written.view(-1, t.num_kv_heads, t.head_dim)[slots], v.float()))
        for name, (value, expected) in zip(("q", "k", "v"), checks, strict=True):
            reason = close(value, expected, t.dtype)
            if reason is not None:
                return f"{name}: {reason}"
        return None

    return [Case("strided q/k/v into scrambled slots", args, verify, writes=(5, 6))]


def _cos_sin(head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(ROPE_POSITIONS, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1)


def _swiglu_cases(target: Target, gen: torch.Generator) -> list[Case]:
    gate_up = _randn(gen, target, ROWS, 4 * target.hidden_size)
    expected = torch_ref.swiglu(gate_up.float())
    return [Case("gate|up rows", (gate_up,), _close_one(expected, target.dtype))]


# --- linear projections ----------------------------------------------------------------------


def _linear_cases(target: Target, gen: torch.Generator) -> list[Case]:
    """Row counts on both sides of a skinny kernel's limit, the model's hidden size and an
    uneven one, with and without a bias."""
    t, dt = target, target.dtype
    cases = []
    for rows, out_dim, in_dim in ((1, 96, t.hidden_size), (ROWS, t.hidden_size, 200), (33, 48, 72), (70, 40, 64)):
        x = _randn(gen, t, rows, in_dim)
        w = _randn(gen, t, out_dim, in_dim) * in_dim**-0.5
        expected = x.float() @ w.float().T
        cases.append(Case(f"{rows}x{in_dim} by {out_dim}", (x, w), _close_one(expected, dt)))
    bias = _randn(gen, t, 40)
    x, w = _randn(gen, t, 5, 64), _randn(gen, t, 40, 64) / 8
    expected = x.float() @ w.float().T + bias.float()
    cases.append(Case("with a bias", (x, w, bias), _close_one(expected, dt)))
    return cases


def _swiglu_linear_cases(target: Target, gen: torch.Generator) -> list[Case]:
    """The down projection's activation and GEMM: rows on both sides of a fused kernel's limit,
    the model's intermediate (as K) and hidden (as N) sizes, and an odd K."""
    t, dt = target, target.dtype
    inner = t.intermediate_size or 4 * t.hidden_size
    cases = []
    for rows, out_dim, in_dim in ((1, 96, inner), (ROWS, t.hidden_size, 200), (33, 48, 37), (70, 40, 64)):
        gate_up = _randn(gen, t, rows, 2 * in_dim)
        w = _randn(gen, t, out_dim, in_dim) * in_dim**-0.5
        expected = torch_ref.swiglu_linear(gate_up.float(), w.float())
        label = f"{rows}x{2 * in_dim} by {out_dim}"
        cases.append(Case(label, (gate_up, w), _close_one(expected, dt)))
    return cases


# --- sampling --------------------------------------------------------------------------------

PLANTED = (20.0, 19.5, 19.0, 18.5, 18.0)  # far above N(0, 1) noise: the top tokens are known


def _copy_kv_blocks_cases(target: Target, gen: torch.Generator) -> list[Case]:
    """A small pool (3 layers, 9 blocks): one pair, then several in scrambled order; every
    block that is not a destination must keep its values."""
    t = target
    storage = _randn(gen, t, 3, 2, 9, t.block_size, t.num_kv_heads, t.head_dim)
    cases = []
    for label, pairs in (("one block", [(4, 7)]), ("three blocks", [(8, 1), (2, 5), (0, 6)])):
        expected = storage.clone()
        for src, dst in pairs:
            expected[:, :, dst] = storage[:, :, src]

        def verify(got: Any, expected: torch.Tensor = expected) -> str | None:
            _, written = got
            return None if torch.equal(written, expected) else "the pool differs from the reference"

        cases.append(Case(label, (storage, pairs), verify, writes=(0,)))
    return cases


def _sample_cases(target: Target, gen: torch.Generator) -> list[Case]:
    rows = 8
    logits = _randn(gen, target, rows, target.vocab_size)
    top = torch.stack([_randperm(gen, target, target.vocab_size)[:5] for _ in range(rows)])
    logits.scatter_(1, top, torch.tensor(PLANTED, device=target.device).expand(rows, 5).to(logits.dtype))
    greedy = SamplingBatch(*_params(target, [(0.0, 1.0, 0)] * rows), all_greedy=True)
    # (temperature, top_p, top_k, how many of the planted tokens may come out)
    mixed_rows = [(0.0, 1.0, 0, 1), (0.8, 1.0, 1, 1), (1.0, 1.0, 5, 5), (1.0, 0.6, 0, 2)]
    mixed_rows += [(0.7, 0.99, 3, 3), (1.0, 1.0, 2, 2), (0.0, 0.5, 7, 1), (1.3, 1.0, 4, 4)]
    mixed = SamplingBatch(*_params(target, [r[:3] for r in mixed_rows]), all_greedy=False)
    allowed = [top[i, : r[3]].tolist() for i, r in enumerate(mixed_rows)]
    return [
        Case("all greedy", (logits, greedy), _tokens_in(top[:, :1].tolist(), rows)),
        Case("mixed", (logits, mixed), _tokens_in(allowed, rows)),
        _spread_case(target, logits[:1].expand(SPREAD_ROWS, -1).contiguous(), top[0].tolist()),
    ]


SPREAD_ROWS = 32


def _spread_case(target: Target, logits: torch.Tensor, planted: list[int]) -> Case:
    """Every row samples at temperature 1 from the same five tokens: they cannot all agree.

    The top token has probability 0.43, so 32 rows all picking it happens once in 10^12.
    """
    params = SamplingBatch(*_params(target, [(1.0, 1.0, 5)] * SPREAD_ROWS), all_greedy=False)
    params.generators[:] = [
        torch.Generator(device=target.device).manual_seed(2000 + i) for i in range(SPREAD_ROWS)
    ]
    in_set = _tokens_in([planted] * SPREAD_ROWS, SPREAD_ROWS)

    def verify(got: Any) -> str | None:
        reason = in_set(got)
        if reason is None and len(set(got.tolist())) == 1:
            reason = f"all {SPREAD_ROWS} rows sampled token {got[0].item()}: it always takes the top token"
        return reason

    return Case("sampling spread", (logits, params), verify)


def _randperm(gen: torch.Generator, target: Target, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=gen, device=target.device)


def _params(target: Target, rows: list[tuple[float, float, int]]) -> tuple[Any, ...]:
    device = target.device
    temperature = torch.tensor([r[0] for r in rows], dtype=torch.float32, device=device)
    top_p = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=device)
    top_k = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=device)
    gens: list[torch.Generator | None] = [
        None if i % 3 == 2 else torch.Generator(device=device).manual_seed(1000 + i)
        for i in range(len(rows))
    ]
    return temperature, top_p, top_k, gens


def _tokens_in(allowed: list[list[int]], rows: int) -> Verify:
    def verify(got: Any) -> str | None:
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (rows,):
            return f"expected a tensor of {rows} token ids, got {_describe(got)}"
        if got.dtype.is_floating_point:
            return f"token ids in {got.dtype}, expected an integer dtype"
        for row, (token, ok) in enumerate(zip(got.tolist(), allowed, strict=True)):
            if token not in ok:
                return f"row {row} sampled token {token}, outside the allowed {ok}"
        return None

    return verify


# --- attention -------------------------------------------------------------------------------


def _attention_cases(target: Target, gen: torch.Generator, decode: bool, real_size: bool) -> list[Case]:
    bs = target.block_size
    if decode:
        small = [(1, 1), (1, bs), (1, bs + 1), (1, 3 * bs + 5), (1, 7)]
        big = [(1, 19000), (1, 4100), (1, 1)]
    else:
        small = [(1, bs + 3), (5, 2 * bs + 1), (bs + 2, bs + 2), (3, 3 * bs), (1, 1), (2, 2)]
        big = [(2600, 2696), (1, 700)]
    window = target.sliding_window
    small_window = None if window is None else min(window, bs + 2)  # so the window bites
    cases = [attention_case(target, gen, small, decode, small_window, "mixed batch")]
    if real_size:
        label = "real-size batch " + ", ".join(f"{q}q/{c}k" for q, c in big)
        cases.append(attention_case(target, gen, big, decode, window, label))
    return cases


def attention_case(
    target: Target,
    gen: torch.Generator,
    seqs: list[tuple[int, int]],
    decode: bool,
    window: int | None,
    label: str,
) -> Case:
    """A batch of sequences given as (new tokens, context length after them)."""
    q, k_cache, v_cache, meta = attention_inputs(target, gen, seqs, decode)
    scale = target.head_dim**-0.5
    expected = torch_ref.paged_attention(
        q.float(), k_cache.float(), v_cache.float(), meta, scale, window
    )
    args = (q, k_cache, v_cache, meta, scale, window)
    return Case(label, args, _close_one(expected, target.dtype))


def attention_inputs(
    target: Target, gen: torch.Generator, seqs: list[tuple[int, int]], decode: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta]:
    t, bs = target, target.block_size
    need = [math.ceil(ctx / bs) for _, ctx in seqs]
    total = sum(need) + 2
    order = _randperm(gen, t, total).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at : at + n])
        at += n
    unused = order[at:]
    _share_first_block(tables, seqs, bs, unused)
    k_cache = _randn(gen, t, total, bs, t.num_kv_heads, t.head_dim)
    v_cache = _randn(gen, t, total, bs, t.num_kv_heads, t.head_dim)
    _poison(k_cache, v_cache, tables, seqs, unused)
    width = max(need) + 1  # a padding column that points at a poisoned block
    padded = [row + [unused[0]] * (width - len(row)) for row in tables]
    q = _randn(gen, t, sum(n for n, _ in seqs), t.num_heads, t.head_dim)
    return q, k_cache, v_cache, _meta(padded, seqs, bs, decode, t.device)


def _share_first_block(tables: list[list[int]], seqs: list[tuple[int, int]], bs: int, unused: list[int]) -> None:
    """Two sequences whose new tokens lie past their first block share that block (a prompt)."""
    full = [i for i, (n, ctx) in enumerate(seqs) if ctx - n >= bs]
    if len(full) >= 2:
        a, b = full[0], full[1]
        unused.append(tables[b][0])
        tables[b][0] = tables[a][0]


def _poison(k: torch.Tensor, v: torch.Tensor, tables: list[list[int]], seqs: list[tuple[int, int]], unused: list[int]) -> None:
    bs = k.shape[1]
    for cache in (k, v):
        cache[unused] = float("nan")
        for row, (_, ctx) in zip(tables, seqs, strict=True):
            tail = ctx % bs
            if tail:
                cache[row[-1], tail:] = float("nan")


def _meta(
    tables: list[list[int]], seqs: list[tuple[int, int]], bs: int, decode: bool, device: torch.device
) -> AttentionMeta:
    starts, slots = [0], []
    for row, (n, ctx) in zip(tables, seqs, strict=True):
        starts.append(starts[-1] + n)
        slots += [row[p // bs] * bs + p % bs for p in range(ctx - n, ctx)]
    contexts = [ctx for _, ctx in seqs]
    return AttentionMeta(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_starts=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(contexts, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        query_starts_list=starts,
        context_lens_list=contexts,
        decode_only=decode,
    )


# --- helpers ---------------------------------------------------------------------------------


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (so NaN equals NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = _BITS.get(a.element_size())
    if bits is None or a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(bits), b.view(bits))


def _device_of(args: tuple[Any, ...]) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def _prime_allocator(args: tuple[Any, ...]) -> None:
    """On CUDA, leave NaN in freed memory so that outputs a kernel never writes read as NaN."""
    device = _device_of(args)
    if device.type != "cuda":
        return
    size = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    torch.full((min(size, 1 << 28),), float("nan"), device=device)  # freed at once, kept cached


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else repr(exc)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


_BUILDERS: dict[str, Callable[[Target, torch.Generator], list[Case]]] = {
    "rms_norm": _rms_norm_cases,
    "add_rms_norm": _add_rms_norm_cases,
    "rope": _rope_cases,
    "rope_store_kv": _rope_store_kv_cases,
    "swiglu": _swiglu_cases,
    "linear": _linear_cases,
    "swiglu_linear": _swiglu_linear_cases,
    "sample": _sample_cases,
    "copy_kv_blocks": _copy_kv_blocks_cases,
}
