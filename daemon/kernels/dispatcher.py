"""Resolves one kernel per operation at startup and binds them into a ``Kernels`` record.

Every candidate is checked against the reference on a small random input before it is bound;
a candidate that fails is refused with its reason, and the table of decisions is kept for
``livelm kernels`` and the logs. Only the torch reference backend exists so far; the GPU
backends plug in as further candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.daemon.kernels.ops import OPERATIONS, Kernels
from livelm.daemon.kernels.torch_ref import REFERENCE


@dataclass(frozen=True)
class Decision:
    operation: str
    candidate: str
    chosen: bool
    reason: str


@dataclass(frozen=True)
class Binding:
    kernels: Kernels
    table: tuple[Decision, ...]

    def chosen(self) -> dict[str, str]:
        return {d.operation: d.candidate for d in self.table if d.chosen}


def resolve_kernels(device: torch.device, dtype: torch.dtype) -> Binding:
    """Bind the kernels for this device and dtype (the torch reference for every op today)."""
    table = tuple(
        Decision(op, "torch_ref", True, f"reference, runs on {device.type} in {dtype}")
        for op in OPERATIONS
    )
    return Binding(kernels=REFERENCE, table=table)
