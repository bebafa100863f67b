"""``gc_freeze``: a started engine keeps what it holds out of the cyclic collector's walks,
answers as usual meanwhile, and hands everything back to the collector when it stops."""

from __future__ import annotations

import gc

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("demo-cache")
    return loaded(ensure_demo_model(cache), cache)


async def _frozen_while_answering(engine: Engine) -> tuple[int, int]:
    sid = (await engine.init_session(InitRequest(prompt="Prices:", template="raw"))).session_id
    await engine.push(sid, [f"AAPL {180 + i}.5" for i in range(4)])
    done = await engine.generate(sid, GenerateRequest(prompt="Next:", max_tokens=3)).result()
    return gc.get_freeze_count(), len(done.tokens)


def test_engine_freezes_the_heap_while_it_runs(demo) -> None:
    frozen, answered = run_engine(demo, _frozen_while_answering, gc_freeze=True)
    assert frozen > 1000  # the model, tokenizer and engine at least
    assert answered == 3
    assert gc.get_freeze_count() == 0  # stopped: collectable again


def test_engine_leaves_the_collector_alone_when_told(demo) -> None:
    frozen, answered = run_engine(demo, _frozen_while_answering, gc_freeze=False)
    assert frozen == 0 and answered == 3
