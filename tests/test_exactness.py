"""A session's answers equal Hugging Face transformers over the same tokens, from scratch.

The reference token list is built with transformers' own tokenizer, independently of ours:
raw layout = [BOS] + prompt + each entry rendered as one line + the question.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livelm.daemon.engine.engine import Engine
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine
from tests.tiny_models import hf_greedy, hf_last_logits, make_tiny_checkpoint

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT = "You watch a market feed and answer briefly."
QUESTION = "What did the price do?"
ANSWER_TOKENS = 6


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def hf_tokenizer(family_folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(family_folder)


def feed(start: int, count: int) -> list[str]:
    return [f"AAPL t={1000 + i} o=18{i % 10}.5 c=18{(i * 7) % 10}.25 v={300 + i}" for i in range(start, start + count)]


def reference_ids(tok, prompt: str, entries: list[str], question: str) -> list[int]:
    ids = tok(prompt)["input_ids"]  # the tokenizer's own BOS handling
    for entry in entries:
        ids += tok.encode(entry + "\n", add_special_tokens=False)
    return ids + tok.encode(question, add_special_tokens=False)


def until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


async def ask(engine: Engine, session_id: str, question: str = QUESTION, capture: bool = False):
    handle = engine.generate(
        session_id, GenerateRequest(prompt=question, max_tokens=ANSWER_TOKENS), capture_logits=capture
    )
    done = await handle.result()
    return done, handle.first_logits


def test_raw_session_matches_hf_across_pushes(family_folder, hf_tokenizer, tmp_path):
    model = loaded(family_folder, tmp_path)
    eos = model.eos_ids

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        answers = []
        sent: list[str] = []
        for batch in (feed(0, 3), feed(3, 4), feed(7, 1)):
            await engine.push(sid, batch)
            sent += batch
            answers.append((list(sent), *(await ask(engine, sid, capture=True))))
        # asking twice in a row gives the same answer: the first query left no trace
        answers.append((list(sent), *(await ask(engine, sid, capture=True))))
        return answers

    for entries, done, logits in run_engine(model, scenario):
        assert len(done.tokens) > 0
        ids = reference_ids(hf_tokenizer, PROMPT, entries, QUESTION)
        assert done.usage.context_tokens + done.usage.prompt_tokens == len(ids)
        assert done.data_seq == len(entries)
        expected = until_eos(hf_greedy(family_folder, ids, ANSWER_TOKENS), eos)
        assert done.tokens == expected
        ref = hf_last_logits(family_folder, ids)
        rel = ((logits - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"last-position logits differ from transformers by {rel:.2e}"


def test_interleaved_sessions_do_not_affect_each_other(family_folder, hf_tokenizer, tmp_path):
    model = loaded(family_folder, tmp_path)
    prompts = {"a": "Session A watches apples.", "b": "Session B watches bonds and rates."}
    data = {"a": feed(0, 5), "b": [f"UST10Y y=4.{i}{i} d=-0.0{i}" for i in range(6)]}

    async def scenario(engine: Engine):
        sids = {k: (await engine.init_session(InitRequest(prompt=p, template="raw"))).session_id for k, p in prompts.items()}
        for i in range(6):  # alternate pushes between the sessions
            for key in ("a", "b"):
                if i < len(data[key]):
                    await engine.push(sids[key], [data[key][i]])
        # both asked at once, so their steps share batches
        results = await asyncio.gather(ask(engine, sids["a"]), ask(engine, sids["b"]))
        return dict(zip(("a", "b"), (r[0] for r in results), strict=True))

    answers = run_engine(model, scenario)
    for key, done in answers.items():
        ids = reference_ids(hf_tokenizer, prompts[key], data[key], QUESTION)
        assert done.tokens == until_eos(hf_greedy(family_folder, ids, ANSWER_TOKENS), model.eos_ids)


def test_chat_layout_equals_the_chat_template(family_folder, hf_tokenizer, tmp_path):
    model = loaded(family_folder, tmp_path)
    entries = feed(0, 4)

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT))).session_id
        await engine.push(sid, entries)
        return (await ask(engine, sid))[0]

    done = run_engine(model, scenario)
    user = "".join(e + "\n" for e in entries) + QUESTION
    messages = [{"role": "system", "content": PROMPT}, {"role": "user", "content": user}]
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tokenizer.encode(rendered, add_special_tokens=False)
    assert done.usage.context_tokens + done.usage.prompt_tokens == len(ids)
    assert done.tokens == until_eos(hf_greedy(family_folder, ids, ANSWER_TOKENS), model.eos_ids)


def test_window_overflow_answers_like_a_fresh_session(family_folder, hf_tokenizer, tmp_path):
    model = loaded(family_folder, tmp_path)
    entries = feed(0, 30)

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw", window=160))).session_id
        for i in range(0, len(entries), 4):
            await engine.push(sid, entries[i : i + 4])
        overflowed = (await ask(engine, sid))[0]
        status = engine.status(sid)
        fresh = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        await engine.push(fresh, entries[status.first_seq - 1 :])
        return status, overflowed, (await ask(engine, fresh))[0]

    status, overflowed, fresh = run_engine(model, scenario)
    assert status.dropped_entries > 0 and status.first_seq > 1 and status.entries > 1
    assert status.dropped_entries + status.entries == len(entries)
    assert status.context_tokens <= 160
    assert overflowed.tokens == fresh.tokens
    assert overflowed.usage.context_tokens == fresh.usage.context_tokens
    ids = reference_ids(hf_tokenizer, PROMPT, entries[status.first_seq - 1 :], QUESTION)
    assert overflowed.tokens == until_eos(hf_greedy(family_folder, ids, ANSWER_TOKENS), model.eos_ids)


def test_reprefill_baseline_gives_the_same_answers(family_folder, tmp_path):
    model = loaded(family_folder, tmp_path)

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        await engine.push(sid, feed(0, 6))
        captured = await ask(engine, sid, capture=True)
        plain, _ = await ask(engine, sid)  # its question's last chunk starts decode-ahead's run
        return captured, plain

    (cached, cached_logits), cached_plain = run_engine(model, scenario)
    (fresh, fresh_logits), fresh_plain = run_engine(model, scenario, reprefill_queries=True)
    assert fresh.tokens == cached.tokens and fresh.usage == cached.usage
    assert fresh_plain.tokens == cached_plain.tokens == cached.tokens
    assert ((fresh_logits - cached_logits).norm() / cached_logits.norm()).item() < 1e-5


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama_blocks"), "llama", seed=1)


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_block_sizes_and_chunking_agree(llama_folder, tmp_path, block_size):
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(llama_folder)
    family_folder = llama_folder
    model = loaded(family_folder, tmp_path)
    entries = feed(0, 5)

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        await engine.push(sid, entries)
        return (await ask(engine, sid, capture=True))

    done, logits = run_engine(model, scenario, block_size=block_size, max_batch_tokens=7)
    ids = reference_ids(hf_tokenizer, PROMPT, entries, QUESTION)
    ref = hf_last_logits(family_folder, ids)
    assert ((logits - ref).norm() / ref.norm()).item() < 1e-4
    assert done.tokens == until_eos(hf_greedy(family_folder, ids, ANSWER_TOKENS), model.eos_ids)
