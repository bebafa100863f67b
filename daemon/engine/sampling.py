"""Per-query sampling settings, and the batched form the sample kernel takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.daemon.kernels.ops import SamplingBatch
from livelm.daemon.kernels.transfer import to_device_async


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)
        return gen


def sampling_batch(
    params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device
) -> SamplingBatch:
    floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params]],
                          dtype=torch.float32)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    floats, top_k = to_device_async(floats, device), to_device_async(top_k, device)
    return SamplingBatch(
        temperature=floats[0],
        top_p=floats[1],
        top_k=top_k,
        generators=generators,
        all_greedy=all(p.greedy for p in params),
        filtered=any(not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params),
    )
