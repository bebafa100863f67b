"""How deep the attention kernels' copy pipelines are, compiled for an H100/H200 (sm_90) on any
machine: Triton compiles for a named GPU target without one present. Prints, as JSON, the
``num`` of every async copy wait in each variant's TTGIR (0: the loop waits on copies it has
just issued, so none is in flight while it computes).

Run in a fresh process (``python -m tests.kernel_depth``): the kernels must be imported as
compiled functions, which the interpreter-run tests in the same process replace.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from livelm.daemon.kernels.triton_backend import paged_decode, paged_prefill  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {"q_ptr": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "k_desc": "*bf16",
            "v_desc": "*bf16", "out_ptr": "*bf16", "ws": "*fp32", "query_starts": "*i32",
            "context_lens": "*i32", "block_tables": "*i32"}
ALIGNED_INTS = ("stride_qn", "stride_qh", "stride_kb", "stride_ks", "stride_kh")
COMMON = dict(HEAD_DIM=128, BLOCK_SIZE=64, HAS_WINDOW=False, UPCAST=False, PRECISION="tf32",
              USE_PDL=True, TMA=False, SPLIT=True)


def waits(fn: Any, constants: dict[str, Any], warps: int, stages: int) -> list[int]:
    """The async wait depths of ``fn`` compiled with these constants for sm_90. Pointers and
    strides are marked 16-byte aligned, as triton's launcher marks them at real shapes
    (without that no copy is asynchronous at all)."""
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    aligned = [n for n in names if n in POINTERS or n in ALIGNED_INTS]
    source = ASTSource(
        fn=fn, signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    kernel = triton.compile(source, target=HOPPER,
                            options={"num_warps": warps, "num_stages": stages})
    return [int(n) for n in re.findall(r"async_wait[^{]*\{num = (\d+)", kernel.asm["ttgir"])]


def question_prefill(carry: bool) -> list[int]:
    """The split launch a 32-token question over a long context gets (GQA group 4)."""
    block_m, block_n, warps, stages, _ = paged_prefill._split_tiles(128, torch.bfloat16, 32 * 4)
    constants = dict(COMMON, GROUP=4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=block_m // 4,
                     LAZY=False, CARRY=carry, REVERSE=False)
    return waits(paged_prefill._prefill_kernel, constants, warps, stages)


def split_decode(carry: bool) -> list[int]:
    """One sequence's decode row, split over the context."""
    block_n, warps, stages = paged_decode._tiles(128, torch.bfloat16, True)
    constants = dict(COMMON, GROUP=4, GROUP_PAD=16, BLOCK_N=block_n, CARRY=carry)
    return waits(paged_decode._decode_split_kernel, constants, warps, stages)


def main() -> int:
    report = {
        "question_prefill": question_prefill(paged_prefill.CARRY_PAGES),
        "split_decode": split_decode(paged_decode.CARRY_PAGES),
    }
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
