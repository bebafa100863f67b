"""Host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

import torch


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without waiting for the device: a copy from pageable memory
    would synchronise the stream, and a decode step launched ahead must not wait for the one
    before it."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
