"""Sweep of our skinny Triton GEMM (daemon/kernels/triton_backend/skinny_gemm.py) against cuBLAS
on Llama-3.1-8B's projections at M = 1..64 rows, bf16, in multiples of the weight-read floor
(weight bytes at the device-to-device copy bandwidth measured in the same run).

The ``down_swiglu`` case is the down projection with SwiGLU fused in (``swiglu_linear``: gate_up
[M, 28672] by the [4096, 14336] weight), against the swiglu kernel followed by cuBLAS (reported
as cuBLAS) and by the skinny GEMM with the fused kernel's best config (``unfused_us``).

Each timing captures --calls back-to-back calls in one CUDA graph, cycling through enough copies
of the weight (over 200 MB together) that every call reads its weight from HBM rather than the
60 MB L2, and reports the median over --replays replays, per call. The configs per (shape, M):
a first pass over tile shapes and K splits (semaphore combine, 4 warps, the deepest pipeline
up to 4 stages that fits in shared memory), plus the CUDA-core path for M <= 2; then the best
three again with the atomic combine, 8 warps, and one stage more or fewer. Compiles run ahead
in a thread pool where triton has AsyncCompileMode. The best config's output is checked
against cuBLAS.

    python perf/skinny_gemm_bench.py [--quick] [--out perf/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from livelm.daemon.kernels.triton_backend.skinny_gemm import SkinnyConfig

ROOT = Path(__file__).resolve().parents[1]
# (name, out_features N, in_features K) of Llama-3.1-8B's per-layer projections
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("down", 4096, 14336), ("gate_up", 28672, 4096),
          ("down_swiglu", 4096, 14336)]
FUSED = {"down_swiglu"}  # x is gate_up [M, 2K], through swiglu_linear
ROWS = "1,8,16,32,48,64"
DTYPE = torch.bfloat16
L2_DEFEAT_BYTES = 200e6  # H200 L2: 60 MB
SMEM_BUDGET = 200 * 1024  # of the 227 KiB a block may use on Hopper
# (BLOCK_N, BLOCK_K): 8-32 KiB of bf16 weight per pipeline stage
DOT_TILES = [(32, 128), (32, 256), (64, 128), (64, 256), (128, 64), (128, 128)]
FMA_TILES = [(16, 512), (32, 256), (32, 512), (64, 256)]  # block_m < 16: CUDA cores, M <= 2
QUICK_DOT_TILES, QUICK_FMA_TILES = [(64, 128)], [(32, 256)]
SPLITS = (1, 2, 4, 8, 16)
REFINE_TOP = 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="perf/results", help="folder for the JSON results")
    p.add_argument("--quick", action="store_true", help="a tiny grid: one tile shape, no refining")
    p.add_argument("--rows", default=ROWS, help=f"M values (default {ROWS})")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES),
                   help="which of qkv,o,down,gate_up,down_swiglu")
    p.add_argument("--calls", type=int, default=20, help="calls captured per graph")
    p.add_argument("--replays", type=int, default=9, help="timed replays per graph (median)")
    return p.parse_args()


def _import_kernel() -> ModuleType:
    try:
        import livelm.daemon  # noqa: F401
    except ImportError:  # a checkout that is not installed: map the folders by hand
        sys.path.insert(0, str(ROOT))
        import livelm

        livelm.__path__.append(str(ROOT))
    from livelm.daemon.kernels.triton_backend import skinny_gemm

    return skinny_gemm


# ---- the config grid ---------------------------------------------------------------------------
def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _stages(block_m: int, block_n: int, block_k: int, want: int) -> int | None:
    """The deepest pipeline up to ``want`` whose bf16 tiles fit the shared-memory budget."""
    per_stage = (block_n + max(block_m, 16)) * block_k * 2
    fits = min(want, SMEM_BUDGET // per_stage)
    return fits if fits >= 2 else None


def _splits(n_tiles: int, k: int, block_k: int, num_sms: int) -> list[int]:
    """K splits of whole tiles (two steps or more) that neither leave most SMs idle nor keep
    splitting once there are two programs per SM."""
    chosen = []
    for s in SPLITS:
        if k % (block_k * s) or k // s < 2 * block_k or 2 * n_tiles * s < num_sms:
            continue
        if s > 1 and n_tiles * s // 2 >= 2 * num_sms:
            break
        chosen.append(s)
    return chosen


def first_pass(sg: ModuleType, m: int, n: int, k: int, num_sms: int,
               quick: bool) -> list[SkinnyConfig]:
    dot_m = max(16, _pow2_at_least(m))
    paths = [(dot_m, QUICK_DOT_TILES if quick else DOT_TILES)]
    if m <= 2:
        paths.append((_pow2_at_least(m), QUICK_FMA_TILES if quick else FMA_TILES))
    configs = []
    for block_m, tiles in paths:
        for block_n, block_k in tiles:
            stages = _stages(block_m, block_n, block_k, 4) if block_m >= 16 else 3
            if stages is None:
                continue
            n_tiles = -(-n // block_n) * -(-m // block_m)
            for s in _splits(n_tiles, k, block_k, num_sms):
                configs.append(sg.SkinnyConfig(block_m, block_n, block_k, s, 4, stages))
    return configs


def refinements(ranked: Iterable[SkinnyConfig], top: int) -> list[SkinnyConfig]:
    """Variants of the ``top`` best: the other combine, 8 warps, one stage more or fewer."""
    out: list[SkinnyConfig] = []
    for c in list(ranked)[:top]:
        if c.split_k > 1:
            out.append(dataclasses.replace(
                c, combine="atomic" if c.combine == "semaphore" else "semaphore"))
        out.append(dataclasses.replace(c, num_warps=8))
        if c.uses_dot:
            deeper = _stages(c.block_m, c.block_n, c.block_k, c.num_stages + 1)
            if deeper == c.num_stages + 1:
                out.append(dataclasses.replace(c, num_stages=deeper))
            if c.num_stages > 2:
                out.append(dataclasses.replace(c, num_stages=c.num_stages - 1))
    return out


def precompile(sg: ModuleType, jobs: list[tuple[int, int, int, SkinnyConfig]],
               swiglu: bool = False) -> None:
    """Compile ahead in threads (ptxas runs outside the GIL); lazily at first call otherwise."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    try:
        with ThreadPoolExecutor(min(16, os.cpu_count() or 4)) as pool, \
                AsyncCompileMode(pool, ignore_errors=True):
            for m, n, k, config in jobs:
                sg.precompile(m, n, k, DTYPE, config, swiglu=swiglu)
    except Exception as exc:  # noqa: BLE001 - whatever failed compiles again at first call
        print(f"  precompile: {type(exc).__name__}: {exc}; compiling at first call", flush=True)


# ---- timing ------------------------------------------------------------------------------------
def graph_us(call: Callable[[int], object], calls: int, replays: int) -> float:
    """Per-call µs: median replay of one graph holding ``calls`` calls (call(i) for each i)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(0)  # compiles, and allocates what is kept across calls, outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1e3 * statistics.median(times) / calls


@dataclasses.dataclass
class Case:
    name: str
    n: int
    k: int
    m: int
    x: torch.Tensor
    weights: list[torch.Tensor]
    floor_us: float
    fused: bool = False  # x is gate_up [m, 2k]: swiglu_linear against swiglu, then the GEMM

    def ours(self, sg: ModuleType) -> Callable[..., torch.Tensor]:
        return sg.swiglu_linear if self.fused else sg.skinny_linear

    def act(self, sg: ModuleType) -> torch.Tensor:
        """The GEMM's x for the unfused runs (the swiglu kernel's output when fused)."""
        return sg.swiglu_kernel.swiglu(self.x) if self.fused else self.x


def time_config(sg: ModuleType, case: Case, config: SkinnyConfig,
                args: argparse.Namespace) -> dict[str, Any]:
    ws, ours = case.weights, case.ours(sg)
    row: dict[str, Any] = {"config": dataclasses.asdict(config)}
    try:
        row["us"] = graph_us(lambda i: ours(case.x, ws[i % len(ws)], config),
                             args.calls, args.replays)
    except Exception as exc:  # noqa: BLE001 - out of shared memory etc.: note it, go on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def sweep_case(sg: ModuleType, case: Case, num_sms: int, args: argparse.Namespace) -> dict:
    started = time.time()
    ws, ours = case.weights, case.ours(sg)
    cublas = graph_us(lambda i: F.linear(case.act(sg), ws[i % len(ws)]), args.calls, args.replays)
    pick = sg.swiglu_default_config if case.fused else sg.default_config
    default = pick(case.m, case.n, case.k, num_sms)
    timed: dict[SkinnyConfig, dict[str, Any]] = {}

    def run(configs: list[SkinnyConfig]) -> None:
        fresh = [c for c in dict.fromkeys(configs) if c not in timed]
        precompile(sg, [(case.m, case.n, case.k, c) for c in fresh], case.fused)
        for c in fresh:
            timed[c] = time_config(sg, case, c, args)

    run([default, *first_pass(sg, case.m, case.n, case.k, num_sms, args.quick)])
    if not args.quick:
        run(refinements(_ranked(timed), REFINE_TOP))
    best = _ranked(timed)[0]
    act = case.act(sg)
    mine, theirs = ours(case.x, ws[0], best).float(), F.linear(act, ws[0]).float()
    exact = act.float() @ ws[0].float().T
    result = {
        "gemm": case.name, "n": case.n, "k": case.k, "m": case.m, "floor_us": case.floor_us,
        "cublas_us": cublas, "best_us": timed[best]["us"], "best_config": dataclasses.asdict(best),
        "default_us": timed[default].get("us"), "default_config": dataclasses.asdict(default),
        "max_abs_err_vs_cublas": (mine - theirs).abs().max().item(),
        "max_abs_err_cublas_vs_fp32": (theirs - exact).abs().max().item(),
        "max_abs_err_vs_fp32": (mine - exact).abs().max().item(), "configs_timed": len(timed),
        "seconds": time.time() - started, "sweep": list(timed.values()),
    }
    if case.fused:  # the two-kernel path with the same config: what fusing saves
        result["unfused_us"] = graph_us(
            lambda i: sg.skinny_linear(case.act(sg), ws[i % len(ws)], best),
            args.calls, args.replays)
    print(_line(result), flush=True)
    return result


def _ranked(timed: dict[SkinnyConfig, dict[str, Any]]) -> list[SkinnyConfig]:
    ok = [c for c, r in timed.items() if "us" in r]
    if not ok:
        raise RuntimeError("no config ran: " + "; ".join(r["error"] for r in timed.values()))
    return sorted(ok, key=lambda c: timed[c]["us"])


# ---- report ------------------------------------------------------------------------------------
def _config_str(c: dict[str, Any]) -> str:
    combine = f" {c['combine']}" if c["split_k"] > 1 else ""
    return (f"m{c['block_m']} n{c['block_n']} k{c['block_k']} s{c['split_k']} "
            f"w{c['num_warps']} st{c['num_stages']}{combine}")


def _line(r: dict[str, Any]) -> str:
    f = r["floor_us"]
    d = r["default_us"]
    default = f"{d:.1f} us ({d / f:.2f}x)" if d is not None else "error"
    fused = "unfused_us" in r
    unfused = f"  swiglu+triton {r['unfused_us']:.1f} us" if fused else ""
    cublas = "swiglu+cuBLAS" if fused else "cuBLAS"
    return (f"{r['gemm']:>7} M={r['m']:<3d}{unfused}  {cublas} {r['cublas_us']:6.1f} us "
            f"({r['cublas_us'] / f:.2f}x)  triton {r['best_us']:6.1f} us "
            f"({r['best_us'] / f:.2f}x) [{_config_str(r['best_config'])}]  default {default}"
            f"  floor {f:.1f} us  max err vs cuBLAS {r['max_abs_err_vs_cublas']:.1e} (both vs "
            f"fp32 {r['max_abs_err_vs_fp32']:.1e}, {r['max_abs_err_cublas_vs_fp32']:.1e})  "
            f"({r['configs_timed']} configs, {r['seconds']:.0f} s)")


def table(results: list[dict[str, Any]]) -> str:
    head = ("| GEMM | M | floor µs | cuBLAS µs | × floor | triton µs | × floor | default µs "
            "| × floor | best config | max abs err vs cuBLAS |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        f = r["floor_us"]
        d = r["default_us"]
        default = (f"{d:.1f} | {d / f:.2f}" if d is not None else "error | ")
        lines.append(
            f"| {r['gemm']} | {r['m']} | {f:.1f} | {r['cublas_us']:.1f} | "
            f"{r['cublas_us'] / f:.2f} | {r['best_us']:.1f} | {r['best_us'] / f:.2f} | "
            f"{default} | {_config_str(r['best_config'])} | {r['max_abs_err_vs_cublas']:.1e} |")
    return "\n".join(lines)


def _weights(n: int, k: int, device: torch.device) -> list[torch.Tensor]:
    """Enough copies (at least two) that cycling through them defeats the L2."""
    copies = max(2, -(-int(L2_DEFEAT_BYTES) // (n * k * 2)))
    return [torch.randn(n, k, device=device, dtype=DTYPE).mul_(k**-0.5) for _ in range(copies)]


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("skinny_gemm_bench needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it on the GPU machine", file=sys.stderr)
        return 2
    try:
        sg = _import_kernel()
    except ImportError as exc:
        print(f"skinny_gemm_bench needs triton and livelm: {exc}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from floor import measure_ceilings

    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    copy_bw = measure_ceilings(device).copy_bytes_per_s
    print(f"{torch.cuda.get_device_name(device)}, {num_sms} SMs, copy {copy_bw / 1e12:.2f} TB/s",
          flush=True)
    wanted = set(args.shapes.split(","))
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    started = time.time()
    for name, n, k in (s for s in SHAPES if s[0] in wanted):
        weights = _weights(n, k, device)
        for m in rows:
            fused = name in FUSED
            x = torch.randn(m, 2 * k if fused else k, device=device, dtype=DTYPE)
            case = Case(name, n, k, m, x, weights, n * k * 2 / copy_bw * 1e6, fused)
            results.append(sweep_case(sg, case, num_sms, args))
        del weights
        torch.cuda.empty_cache()
    print(table(results))
    print(f"sweep took {time.time() - started:.0f} s")
    return _write(results, args, device, copy_bw, num_sms)


def _write(results: list[dict[str, Any]], args: argparse.Namespace, device: torch.device,
           copy_bw: float, num_sms: int) -> int:
    import run_meta  # perf/ is on sys.path since main
    import triton

    gpu = torch.cuda.get_device_name(device)
    meta = {
        "commit": run_meta.commit(), "gpu": gpu, "sms": num_sms,
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(DTYPE),
        "date": time.strftime("%Y-%m-%d"), "args": vars(args), "copy_bytes_per_s": copy_bw,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{meta['date']}-{gpu.replace(' ', '-').lower()}-skinny-gemm.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
