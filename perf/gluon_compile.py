"""Compile the Gluon prefill attention kernel for an H100/H200 (sm_90) on any machine, as the
GPU would at its real shapes, and print its resource use: shared memory, registers, spills,
the depths of its warpgroup MMA waits, and whether ptxas serialised those MMAs. A CPU machine catches compile errors this way.

Run in a fresh process: ``python perf/gluon_compile.py [--stages N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from livelm.daemon.kernels.triton_backend import gluon_prefill  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {"q_ptr": "*bf16", "out_ptr": "*bf16", "ws": "*fp32", "query_starts": "*i32",
            "context_lens": "*i32", "block_tables": "*i32"}
ALIGNED = ("q_ptr", "out_ptr", "ws", "query_starts", "context_lens", "block_tables",
           "stride_qn", "stride_qh", "stride_bt")


def compile_kernel(split: bool, stages: int, head_dim: int = 128) -> dict[str, object]:
    import torch
    import triton

    fn = gluon_prefill._prefill_kernel
    layout = gluon_prefill.smem_layout(head_dim, torch.bfloat16)
    desc = f"tensordesc<bf16[{gluon_prefill.PAGE}, {head_dim}],{layout!r}>"
    constants = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_M=gluon_prefill.BLOCK_M,
                     BLOCK_Q=gluon_prefill.BLOCK_M // 4, SPLIT=split, STAGES=stages,
                     REVERSE=True, USE_PDL=True, num_warps=gluon_prefill.WARPS)
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in ("k_desc", "v_desc"):
            signature[name] = desc
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    source = GluonASTSource(fn, signature, constants, attrs)
    kernel = triton.compile(source, target=HOPPER,
                            options={"num_warps": gluon_prefill.WARPS, "num_stages": 1})
    registers, spills, serialized = ptxas_usage(kernel.asm["ptx"])
    return {
        "split": split, "stages": stages,
        "shared_bytes": kernel.metadata.shared,
        "registers": registers,
        "spill_bytes": spills,
        "wgmma_serialized": serialized,
        "ptx_wait_depths": [int(n) for n in re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)",
                                                       kernel.asm["ptx"])],
        "ptx_wgmma": len(re.findall(r"wgmma.mma_async", kernel.asm["ptx"])),
    }


def ptxas_usage(ptx: str) -> tuple[int, int, bool]:
    """Registers per thread, spill-store bytes, and whether ptxas serialised the warpgroup
    MMAs (its info C7514: registers of an MMA in flight are touched, so every MMA waits for
    the one before it and nothing overlaps), from ``ptxas -v`` on the kernel's PTX."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o",
                               os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    used = re.search(r"Used (\d+) registers", done.stderr)
    spill = re.search(r"(\d+) bytes spill stores", done.stderr)
    serialized = "wgmma.mma_async instructions are serialized" in done.stderr
    return int(used.group(1)) if used else -1, int(spill.group(1)) if spill else -1, serialized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=gluon_prefill.STAGES)
    args = parser.parse_args()
    report = [compile_kernel(split, args.stages) for split in (True, False)]
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
