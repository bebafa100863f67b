"""Programmatic dependent launch: off where it cannot work, and on Hopper GPUs a chain of our
kernels gives the same bits launched with it (eagerly and replayed from a CUDA graph) as
without it."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpret import CUDA, DEVICE, import_kernels, interpreter_while_testing

PACKAGE = "livelm.daemon.kernels.triton_backend"
mods = import_kernels([f"{PACKAGE}.{m}" for m in ("pdl", "norms", "swiglu", "rope")])
norms, swiglu, rope, pdl = (mods[f"{PACKAGE}.{m}"] for m in ("norms", "swiglu", "rope", "pdl"))
_interpreter_while_testing = pytest.fixture(autouse=True, scope="module")(interpreter_while_testing)
HOPPER = CUDA and torch.cuda.get_device_capability() >= (9, 0)


def test_pdl_is_off_on_the_cpu() -> None:
    assert pdl.launch_args(torch.device("cpu")) == {"USE_PDL": False}
    assert not pdl.enabled_on(torch.device("cpu"))


@pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability 9.0+")
def test_pdl_is_on_on_hopper_unless_switched_off() -> None:
    assert pdl.triton_supports_pdl()
    assert pdl.enabled_on(DEVICE)
    pdl.set_enabled(False)
    try:
        assert not pdl.enabled_on(DEVICE)
        assert pdl.launch_args(DEVICE) == {"USE_PDL": False}
    finally:
        pdl.set_enabled(True)


def _chain(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
           cos_sin: torch.Tensor) -> list[torch.Tensor]:
    """Each kernel reads what the one before it wrote: a race would show as changed bits."""
    normed, summed = norms.add_rms_norm(x, res, w, 1e-5)
    act = swiglu.swiglu(torch.cat([normed, summed], dim=-1))
    heads = act.view(act.shape[0], -1, 128)
    q, k = rope.rope(heads, heads[:, :8], positions, cos_sin)
    return [summed, norms.rms_norm(q.reshape(act.shape), w, 1e-5), k]


@pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability 9.0+")
def test_a_pdl_chain_matches_plain_launches_eagerly_and_in_a_cuda_graph() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n, d = 48, 4096
    x, res = (torch.randn(n, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
              for _ in range(2))
    w = torch.rand(d, device=DEVICE, generator=gen, dtype=torch.bfloat16) + 0.5
    positions = torch.arange(100, 100 + n, device=DEVICE)
    angles = torch.rand(512, 1, 128, device=DEVICE, generator=gen)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)
    pdl.set_enabled(False)
    try:
        plain = _chain(x, res, w, positions, cos_sin)
    finally:
        pdl.set_enabled(True)
    eager = _chain(x, res, w, positions, cos_sin)
    for a, b in zip(plain, eager, strict=True):
        assert torch.equal(a, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _chain(x, res, w, positions, cos_sin)  # compile and warm outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _chain(x, res, w, positions, cos_sin)
    for _ in range(3):
        x.add_(0.25)  # new inputs each replay, so stale reads would differ
        graph.replay()
        torch.cuda.synchronize()
        pdl.set_enabled(False)
        try:
            expected = _chain(x, res, w, positions, cos_sin)
        finally:
            pdl.set_enabled(True)
        for a, b in zip(expected, captured, strict=True):
            assert torch.equal(a, b)
