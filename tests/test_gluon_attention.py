"""The Gluon (Hopper) prefill attention kernel.

On any machine: it compiles for sm_90 (an H100/H200) as the GPU would, without spilling, with
its value product kept in flight across the next tile's softmax, and refuses shapes it
cannot serve. On a Hopper GPU: it matches the torch reference at Llama-3.1-8B shapes, over
caches whose stale slots hold NaN.

Without CUDA the kernel module is only imported in child processes: this process runs the
other kernels under triton's interpreter, and Gluon imports compiled triton functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from livelm.daemon.kernels import torch_ref
from tests.paged_inputs import paged_batch

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
REFUSALS = [  # dtype, head_dim, page, window, what the reason names
    ("torch.float32", 128, 64, None, "bf16 or fp16"),
    ("torch.bfloat16", 96, 64, None, "head size"),
    ("torch.bfloat16", 128, 16, None, "64-token KV blocks"),
    ("torch.bfloat16", 128, 64, 4096, "sliding window"),
]
FITS = ("torch.bfloat16", 128, 64, None)


def _child(*args: str) -> str:
    """Run python with these arguments in a fresh process without the interpreter."""
    done = subprocess.run([sys.executable, *args], env=CHILD_ENV, capture_output=True,
                          text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _probe() -> dict:
    """From one child process: why Gluon does not import (None if it does), and the kernel's
    refusal reason for each of REFUSALS and for FITS."""
    calls = ", ".join(f"g.unsupported_reason({d}, {h}, 32, 8, {p}, {w})"
                      for d, h, p, w in [case[:4] for case in REFUSALS] + [FITS])
    code = ("import json, torch; from livelm.daemon.kernels.triton_backend import gluon_prefill "
            f"as g; print(json.dumps([g._IMPORT_ERROR, [{calls}]]))")
    missing, reasons = json.loads(_child("-c", code).strip().splitlines()[-1])
    return {"missing": missing, "refusals": reasons[:-1], "fits": reasons[-1]}


PROBE = _probe()
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_gluon = pytest.mark.skipif(PROBE["missing"] is not None, reason=str(PROBE["missing"]))
needs_hopper = pytest.mark.skipif(not HOPPER or PROBE["missing"] is not None,
                                  reason="needs a Hopper GPU and Gluon")


def _kernels():
    from livelm.daemon.kernels.triton_backend import gluon_prefill

    return gluon_prefill


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(ours).all(), "an output element is not finite"
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_gluon
def test_compiles_for_hopper_without_spills() -> None:
    out = _child(str(ROOT / "perf" / "gluon_compile.py"))
    report = json.loads(out[out.index("["):out.rindex("]") + 1])
    for variant in report:
        assert 0 < variant["registers"] <= 255 and variant["spill_bytes"] == 0, variant
        assert variant["shared_bytes"] <= 227 * 1024, variant
        # the loop's waits leave one product in flight (depth 1), and ptxas keeps them
        # asynchronous (it serialises them all if registers of one in flight are touched)
        assert 1 in variant["ptx_wait_depths"] and not variant["wgmma_serialized"], variant


@needs_gluon
def test_descriptors_are_kept_per_pool_and_end_with_it() -> None:
    """A call reuses its layer's descriptors; once the engine that owned a KV pool is gone,
    the pool is freed (a second engine in the same process needs the memory)."""
    code = """
import gc, json, weakref, torch
from livelm.daemon.kernels.triton_backend import gluon_prefill as g
storage = torch.zeros((2, 2, 4, 64, 8, 128), dtype=torch.bfloat16)
layers = [(layer[0], layer[1]) for layer in storage]
first, again, other = (g._descriptors(*layers[i]) for i in (0, 0, 1))
reused = first is again
held = len(g._DESCRIPTORS)
pool = weakref.ref(storage)
del storage, layers, first, again, other
gc.collect()
print(json.dumps([reused, held, len(g._DESCRIPTORS), pool() is None]))
"""
    out = _child("-c", code).strip().splitlines()[-1]
    assert json.loads(out) == [True, 2, 0, True]


@pytest.mark.parametrize("case", range(len(REFUSALS)))
def test_refuses_shapes_it_cannot_serve(case: int) -> None:
    missing, reason, why = PROBE["missing"], PROBE["refusals"][case], REFUSALS[case][4]
    if missing is not None:
        assert reason == missing
    else:
        assert reason is not None and why in reason
        assert PROBE["fits"] is None


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize(("q_lens", "ctx_lens", "splits"), [
    ([32, 32, 32, 51], [2600, 19_000, 32_768, 34_000], None),  # questions and a record: split
    ([2048, 1, 300], [8192, 4000, 300], None),  # an ingest chunk: unsplit
    ([32] * 64, [4096] * 64, None),  # 64 sessions asking at once
    ([1105, 7], [8205, 70], 3),  # a forced split count over several row tiles
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["paged_prefill_attention_gluon",
                                     "paged_prefill_attention_gluon_splits"])
def test_matches_reference_at_model_shapes(q_lens, ctx_lens, splits, dtype, variant) -> None:
    q, kc, vc, meta = paged_batch(q_lens, ctx_lens, 32, 8, 128, 64, dtype)
    kernel = getattr(_kernels(), variant)
    ours = kernel(q, kc, vc, meta, 128**-0.5, None, splits)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 128**-0.5, None)
    assert _rel(ours, ref) < 1e-2


@needs_hopper
@pytest.mark.gpu
def test_head_size_64_and_other_groups() -> None:
    q, kc, vc, meta = paged_batch([40, 3], [900, 64], 16, 2, 64, 64, torch.bfloat16)
    ours = _kernels().paged_prefill_attention_gluon(q, kc, vc, meta, 64**-0.5, None)
    ref = torch_ref.paged_attention(q, kc, vc, meta, 64**-0.5, None)
    assert _rel(ours, ref) < 1e-2
