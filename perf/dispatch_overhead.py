"""Does calling a kernel through the bound ``Kernels`` record cost more than calling it directly?

Times ``kernels.rms_norm(x, w, eps)`` (the hot path's call) against the function object itself,
and, for scale, a call that looks the kernel up in a dict first (what the dispatcher avoids).
Tiny inputs make the call overhead visible. Rounds alternate between the variants; the report
is the median per-call time over rounds. On CUDA the kernels are asynchronous, so what is
timed is the host's cost to issue the call, with a synchronize at the end of each round.

    python perf/dispatch_overhead.py [--iterations N] [--rounds N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from livelm.daemon.kernels.dispatcher import resolve_kernels, target_for
from livelm.daemon.kernels.ops import Kernels
from livelm.daemon.model.presets import preset_config

PRESET = "random:llama-3.1-8b"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = [_measure(device, args.iterations, args.rounds) for device in devices]
    _print(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    return 0


def _measure(device: torch.device, iterations: int, rounds: int) -> dict[str, object]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    binding = resolve_kernels(target_for(preset_config(PRESET), device, dtype, 16))
    kernels = binding.kernels
    direct = kernels.rms_norm  # the very function object the record holds
    table = {"rms_norm": direct}
    x = torch.randn(1, 64, device=device, dtype=dtype)
    w = torch.ones(64, device=device, dtype=dtype)
    eps = 1e-5

    variants: dict[str, Callable[[], None]] = {
        "bound": lambda: _loop_bound(kernels, x, w, eps, iterations),
        "direct": lambda: _loop_direct(direct, x, w, eps, iterations),
        "dict_lookup": lambda: _loop_lookup(table, x, w, eps, iterations),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        run()
    for _ in range(rounds):
        for name, run in variants.items():
            samples[name].append(_timed(run, device) / iterations * 1e9)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "device": str(device),
        "kernel": binding.chosen()["rms_norm"],
        "iterations": iterations,
        "rounds": rounds,
        "ns_per_call": medians,
        "bound_minus_direct_ns": medians["bound"] - medians["direct"],
    }


def _timed(run: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# each loop is written out so that the only difference is how the kernel is reached
def _loop_bound(kernels: Kernels, x: torch.Tensor, w: torch.Tensor, eps: float, n: int) -> None:
    for _ in range(n):
        kernels.rms_norm(x, w, eps)


def _loop_direct(fn: Callable, x: torch.Tensor, w: torch.Tensor, eps: float, n: int) -> None:
    for _ in range(n):
        fn(x, w, eps)


def _loop_lookup(
    table: dict[str, Callable], x: torch.Tensor, w: torch.Tensor, eps: float, n: int
) -> None:
    for _ in range(n):
        table["rms_norm"](x, w, eps)


def _print(results: list[dict[str, object]]) -> None:
    print(f"{'device':8} {'kernel':22} {'bound ns':>10} {'direct ns':>10} {'dict ns':>10} {'bound-direct':>13}")
    for r in results:
        ns = r["ns_per_call"]
        print(
            f"{r['device']:8} {r['kernel']:22} {ns['bound']:10.1f} {ns['direct']:10.1f} "
            f"{ns['dict_lookup']:10.1f} {r['bound_minus_direct_ns']:+13.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
