"""On CUDA in float32, with the kernels the dispatcher binds there, sessions still answer
exactly as transformers does over the same tokens (and as the CPU reference path)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from livelm.daemon.engine.engine import Engine
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine
from tests.tiny_models import hf_greedy, hf_last_logits, make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROMPT, QUESTION = "GPU feed.", "Where next?"


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"gpu-{request.param}"), request.param)


def test_cuda_session_matches_transformers_and_cpu(folder: Path, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    entries = [f"px {i} {100 + 3 * i}" for i in range(40)]

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        out = []
        for i in range(0, len(entries), 10):
            await engine.push(sid, entries[i : i + 10])
            handle = engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=6), capture_logits=True)
            out.append((i + 10, await handle.result(), handle.first_logits))
        return out

    on_gpu = run_engine(loaded(folder, tmp_path, device="cuda"), scenario, max_batch_tokens=48)
    on_cpu = run_engine(loaded(folder, tmp_path, device="cpu"), scenario, max_batch_tokens=48)
    for (n, gpu, gpu_logits), (_, cpu, _) in zip(on_gpu, on_cpu, strict=True):
        ids = tok(PROMPT)["input_ids"]
        for e in entries[:n]:
            ids += tok.encode(e + "\n", add_special_tokens=False)
        ids += tok.encode(QUESTION, add_special_tokens=False)
        ref = hf_last_logits(folder, ids)
        assert ((gpu_logits - ref).norm() / ref.norm()).item() < 1e-4
        assert gpu.tokens == cpu.tokens
        assert gpu.tokens == hf_greedy(folder, ids, 6)[: len(gpu.tokens)]


def test_cuda_concurrent_sessions_decode_as_on_the_cpu(tmp_path: Path) -> None:
    """Sessions of different lengths answering at once: a multi-sequence decode graph, whose
    block tables are narrower than the graph's (packed before their copy), and one batch of
    fork copies for the questions that arrive together."""
    folder = make_tiny_checkpoint(tmp_path / "model", "llama")

    async def scenario(engine: Engine):
        sids = []
        for n in (3, 9, 17, 30, 5):
            sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
            await engine.push(sid, [f"px {i} {100 + 7 * i + n}" for i in range(n)])
            sids.append(sid)
        handles = [engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=12))
                   for sid in sids]
        return [done.tokens for done in await asyncio.gather(*(h.result() for h in handles))]

    on_gpu = run_engine(loaded(folder, tmp_path, device="cuda"), scenario, max_batch_tokens=512)
    on_cpu = run_engine(loaded(folder, tmp_path, device="cpu"), scenario, max_batch_tokens=512)
    assert on_gpu == on_cpu
    assert all(len(tokens) > 0 for tokens in on_gpu)


def test_cuda_data_chunks_replayed_by_graphs_match_transformers(tmp_path: Path) -> None:
    """Pushes of a few hundred tokens ingest through the data graphs (longer than any question
    graph, no logits), padded to their bucket; the answer over them still matches."""
    from transformers import PreTrainedTokenizerFast

    folder = make_tiny_checkpoint(tmp_path / "model", "llama")
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    # about 210 and 160 tokens: past the question graphs (128), within the tiny model's
    # 512-position window, which would otherwise drop the oldest entries
    batches = [[f"px {j} {i} {100 + 3 * j}" for j in range(n)] for i, n in enumerate((20, 15))]

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        for rows in batches:
            await engine.push(sid, rows)
        handle = engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=4),
                                 capture_logits=True)
        graphs = engine.worker.runner.graphs
        done = await handle.result()
        data = {shape[1]: n for (shape, logits), n in dict(graphs.replays).items()
                if not logits and shape[1] > max(graphs.prefill_sizes)}
        return done, handle.first_logits, data

    done, logits, data_replays = run_engine(
        loaded(folder, tmp_path, device="cuda"), scenario, max_batch_tokens=1024)
    assert data_replays, "no data chunk replayed a data graph"
    ids = tok(PROMPT)["input_ids"]
    for rows in batches:
        for e in rows:
            ids += tok.encode(e + "\n", add_special_tokens=False)
    ids += tok.encode(QUESTION, add_special_tokens=False)
    ref = hf_last_logits(folder, ids)
    assert ((logits - ref).norm() / ref.norm()).item() < 1e-4
    assert done.tokens == hf_greedy(folder, ids, 4)[: len(done.tokens)]


def test_cuda_sessions_pushed_at_once_replay_a_packed_graph_as_on_the_cpu(tmp_path: Path) -> None:
    """Pushes to several sessions at once (a feed of many symbols) ingest in steps that pack
    their chunks back to back into one captured graph (``graph_max_data_seqs``); every
    session then answers as on the CPU."""
    folder = make_tiny_checkpoint(tmp_path / "model", "llama")
    sizes = (2, 5, 1, 8, 3)

    async def scenario(engine: Engine):
        sids = [(await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
                for _ in sizes]
        for r in range(3):
            await asyncio.gather(*(
                engine.push(sid, [f"px {r} {i} {100 + 7 * i + k}" for i in range(n)])
                for k, (sid, n) in enumerate(zip(sids, sizes, strict=True))
            ))
        handles = [engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=8))
                   for sid in sids]
        tokens = [done.tokens for done in await asyncio.gather(*(h.result() for h in handles))]
        graphs = engine.worker.runner.graphs
        return tokens, dict(graphs.packed_replays) if graphs is not None else {}

    settings = {"max_batch_tokens": 512, "graph_max_data_seqs": 8}
    on_gpu, packed = run_engine(loaded(folder, tmp_path, device="cuda"), scenario, **settings)
    on_cpu, _ = run_engine(loaded(folder, tmp_path, device="cpu"), scenario, **settings)
    assert packed, "no step packed several sessions' data into a graph"
    assert on_gpu == on_cpu
    assert all(len(tokens) > 0 for tokens in on_gpu)
