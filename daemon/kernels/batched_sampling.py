"""Sampling a whole batch in a few launches, with no host sync.

The reference sampler (``torch_ref.sample``) reads the settings back to the host and walks the
rows one by one, about ten launches per row. Here the batch is handled at once: one division
by the temperatures; one sort when any row filters by top-k or top-p, with both filters
decided on the sorted logits under the reference's rules (top-k keeps every logit at
or above the k-th largest, ties included; top-p keeps tokens until the probability mass
before them reaches p, so the first token always stays); and one draw by the exponential
race: argmax(logit - log E) with E ~ Exp(1) i.i.d. picks token i with probability
softmax(logits)_i. A row with its own generator draws its noise from it (one launch per such
row), so a seeded answer depends on its seed, not on the batch it shares.
"""

from __future__ import annotations

import torch

from livelm.daemon.kernels.ops import SamplingBatch

TINY = torch.finfo(torch.float32).tiny  # keeps -log(noise) finite, so masked logits stay -inf


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    greedy = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy
    hot = params.temperature > 0
    scaled = logits.float() / torch.where(hot, params.temperature, 1.0)[:, None]
    if params.filtered:
        scaled = _filtered(scaled, params.top_k, params.top_p)
    # the noise is drawn per token id, so a row's sample does not depend on the other rows
    choice = (scaled - _noise(scaled, params.generators).log()).argmax(dim=-1)
    return torch.where(hot, choice, greedy)


def _filtered(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The logits with those that top-k or top-p drop set to -inf (decided in sorted order)."""
    vocab = scaled.shape[-1]
    values, order = scaled.sort(dim=-1, descending=True)
    use_k = (top_k > 0) & (top_k < vocab)
    kth = values.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
    values = values.masked_fill(use_k[:, None] & (values < kth), float("-inf"))
    probs = values.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False  # the likeliest token stays, even for a top_p that rounds to 0
    return torch.empty_like(scaled).scatter_(1, order, values.masked_fill(drop, float("-inf")))


def _noise(like: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(like).exponential_()
    for row, gen in enumerate(generators):
        if gen is None:
            continue
        if gen.device == like.device:
            noise[row].exponential_(generator=gen)
        else:
            fresh = torch.empty(like.shape[-1], dtype=like.dtype, device=gen.device)
            noise[row] = fresh.exponential_(generator=gen).to(like.device)
    return noise.clamp_min_(TINY)
