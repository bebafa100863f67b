"""A decode step launched ahead is read back on its own: collecting its tokens waits for its
copy to the host, not for the work queued on the stream after it."""

from __future__ import annotations

import pytest
import torch

from livelm.daemon.engine.runner import PendingStep


def test_tokens_computed_on_the_cpu_are_read_as_they_are() -> None:
    pending = PendingStep.reading_back(torch.tensor([5, 0, 9]))
    assert pending.copied is None
    assert pending.collect().tokens == [5, 0, 9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collect_does_not_wait_for_work_queued_after_the_step() -> None:
    tokens = torch.arange(7, 71, 7, device="cuda")
    pending = PendingStep.reading_back(tokens)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU spinning, queued behind the copy
    later = torch.cuda.Event()
    later.record()
    try:
        assert pending.collect().tokens == list(range(7, 71, 7))
        assert not later.query(), "collect waited for the work launched after the step"
    finally:
        torch.cuda.synchronize()
