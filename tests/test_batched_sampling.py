"""The batched sampler against the reference's filtering rules: greedy rows are argmax, sampled
rows follow the filtered softmax (frequencies over many seeded draws), seeded rows do not
depend on their batch, and the dispatcher's start-up checks accept it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from livelm.daemon.kernels import batched_sampling, torch_ref
from livelm.daemon.kernels.dispatcher import (
    BACKEND_SOURCES,
    ResolveOptions,
    resolve_kernels,
    target_for,
)
from livelm.daemon.kernels.ops import SamplingBatch
from livelm.daemon.kernels.policy import Policy
from livelm.daemon.model.presets import preset_config

# ties at 2.0 and 0.5, so top-k's "at or above the k-th" rule matters
LOGITS = torch.tensor([2.0, 3.1, 2.0, -1.0, 0.5, 0.5, 1.7, -3.0, 0.0, 2.6, -0.4, 1.1])
DRAWS = 20_000


def batch(rows: list[tuple[float, float, int]], generators=None, filtered=True) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.tensor([r[0] for r in rows]),
        top_p=torch.tensor([r[1] for r in rows]),
        top_k=torch.tensor([r[2] for r in rows], dtype=torch.int64),
        generators=generators or [None] * len(rows),
        all_greedy=all(r[0] <= 0 for r in rows),
        filtered=filtered,
    )


def reference_probs(t: float, p: float, k: int) -> torch.Tensor:
    kept = torch_ref._filter_top_p(torch_ref._filter_top_k(LOGITS / t, k), p)
    return torch.softmax(kept, dim=-1)


@pytest.mark.parametrize(
    "setting", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 4), (1.0, 0.6, 5), (2.0, 0.97, 3), (1.0, 1.0, 12)]
)
def test_frequencies_follow_the_reference_filtered_softmax(setting: tuple[float, float, int]) -> None:
    torch.manual_seed(11)
    expected = reference_probs(*setting)
    tokens = batched_sampling.sample(LOGITS.expand(DRAWS, -1).contiguous(), batch([setting] * DRAWS))
    freq = torch.bincount(tokens, minlength=len(LOGITS)).float() / DRAWS
    assert set(tokens.unique().tolist()) == set(expected.nonzero().flatten().tolist())
    assert (freq - expected).abs().max().item() < 0.02  # 6 standard errors at 20k draws


@pytest.mark.parametrize("sampler", [batched_sampling.sample, torch_ref.sample])
def test_a_top_p_that_rounds_to_zero_keeps_the_likeliest_token(sampler) -> None:
    # 1e-46 is a valid top_p in (0, 1] that float32 holds as 0: every token used to be dropped
    rows = [(1.0, 1e-46, 0), (0.8, 5e-324, 3)]
    out = sampler(LOGITS.expand(2, -1).contiguous(), batch(rows, [torch.Generator().manual_seed(1)] * 2))
    assert out.tolist() == [int(LOGITS.argmax())] * 2


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    torch.manual_seed(3)
    logits = torch.randn(6, 50)
    rows = [(0.0, 1.0, 0), (1.0, 0.8, 10), (0.0, 0.5, 3), (1.5, 1.0, 0), (0.0, 1.0, 7), (0.9, 1.0, 2)]
    out = batched_sampling.sample(logits, batch(rows))
    greedy = logits.argmax(-1)
    assert [out[i].item() for i in (0, 2, 4)] == [greedy[i].item() for i in (0, 2, 4)]
    assert out[5].item() in logits[5].topk(2).indices.tolist()


def test_all_greedy_and_unfiltered_batches() -> None:
    logits = torch.randn(4, 30)
    assert torch.equal(batched_sampling.sample(logits, batch([(0.0, 1.0, 0)] * 4)), logits.argmax(-1))
    torch.manual_seed(5)
    unfiltered = batched_sampling.sample(logits, batch([(1.0, 1.0, 0)] * 4, filtered=False))
    torch.manual_seed(5)
    assert torch.equal(unfiltered, batched_sampling.sample(logits, batch([(1.0, 1.0, 0)] * 4)))


def test_a_seeded_row_does_not_depend_on_its_batch() -> None:
    logits = torch.randn(5, 200)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(1234)

    alone = batched_sampling.sample(logits[3:4], batch([(1.0, 1.0, 0)], [seeded()], filtered=False))
    rows = [(1.0, 0.9, 0), (0.0, 1.0, 0), (0.8, 1.0, 20), (1.0, 1.0, 0), (1.2, 1.0, 0)]
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    gens[3] = seeded()
    shared = batched_sampling.sample(logits, batch(rows, gens))
    assert shared[3].item() == alone[0].item()


def test_the_dispatcher_checks_accept_it_and_bind_it_when_preferred() -> None:
    target = dataclasses.replace(
        target_for(preset_config("random:tiny"), torch.device("cpu"), torch.float32, 16)
    )
    binding = resolve_kernels(
        target,
        Policy(prefer={"sample": ("torch_batched.sample",)}),
        ResolveOptions(sources=BACKEND_SOURCES[:1]),
    )
    assert binding.kernels.sample is batched_sampling.sample
    row = next(d for d in binding.table if d.candidate == "torch_batched.sample")
    assert row.status == "chosen"
