"""Does launching a decode step synchronise the CUDA stream? Decoding ahead only overlaps the
host with the GPU if it does not, so this asks for a few answers with torch's sync debug mode
set to "warn" inside every ``ModelRunner.launch_decode`` call, and lists what warned.

    python perf/sync_check.py --model random:tiny
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import QUESTION, Bench  # noqa: E402

from livelm.daemon.config import Config  # noqa: E402
from livelm.daemon.engine.engine import Engine  # noqa: E402
from livelm.daemon.engine.runner import ModelRunner  # noqa: E402
from livelm.daemon.kernels.startup import bind_and_load  # noqa: E402
from livelm.protocol.messages import GenerateRequest  # noqa: E402

NOTICE = "Synchronization debug mode is a prototype"  # torch's note on entering the mode: no sync


def watch_launches(found: list[str]) -> None:
    original = ModelRunner.launch_decode

    @functools.wraps(original)
    def watched(self: ModelRunner, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                found.extend(str(w.message).splitlines()[0] for w in caught
                             if not str(w.message).startswith(NOTICE))

    ModelRunner.launch_decode = watched  # type: ignore[method-assign]


async def answers(model: Any, config: Config, count: int, tokens: int) -> int:
    engine = Engine(model, config, asyncio.get_running_loop())
    engine.start()
    try:
        sid = await Bench(engine).open()
        for _ in range(count):
            await engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=tokens)).result()
        return engine.worker.steps_ahead
    finally:
        await engine.stop(5.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--answers", type=int, default=3)
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()
    config = Config(model=args.model, device="cuda", dtype="bfloat16", kv_cache_tokens=16384)
    _, model = bind_and_load(config, progress=False)
    model = dataclasses.replace(model, eos_ids=frozenset())
    found: list[str] = []
    watch_launches(found)
    ahead = uvloop.run(answers(model, config, args.answers, args.tokens))
    print(f"decode steps launched ahead: {ahead}")
    print(f"syncs inside launch_decode: {len(found)}")
    for message in sorted(set(found)):
        print(f"  {found.count(message)} x {message}")
    return 0 if ahead and not found else 1


if __name__ == "__main__":
    raise SystemExit(main())
