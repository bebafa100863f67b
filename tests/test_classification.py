"""Classification queries (``choices``): the probabilities equal transformers' over the same
tokens, single- and multi-token, in-process and over HTTP; bad choices get a clear 400."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import requests
import torch

from livelm.daemon.engine.engine import Engine
from livelm.protocol.messages import GenerateRequest, InitRequest
from tests.engine_harness import loaded, run_engine
from tests.tiny_models import hf_greedy, hf_last_logits, make_tiny_checkpoint

PROMPT = "You watch a market feed and answer briefly."
QUESTION = "Is the trend up, down or flat? Answer:"
SINGLE = ["A", "B", "C", "7"]  # one byte-level token each
MULTI = [" up", " down", " flat", " sideways", "A"]  # "A" stays one token among longer ones
TIMEOUT = 60


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=7)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """On CUDA the question's prefill replays a captured graph; scoring steps run eagerly."""
    return request.param


@pytest.fixture(scope="module")
def hf_tokenizer(family_folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(family_folder)


def feed(count: int) -> list[str]:
    return [
        f"AAPL t={1000 + i} o=18{i % 10}.5 c=18{(i * 7) % 10}.25 v={300 + i}" for i in range(count)
    ]


def context_ids(tok, entries: list[str]) -> list[int]:
    ids = tok(PROMPT)["input_ids"]
    for entry in entries:
        ids += tok.encode(entry + "\n", add_special_tokens=False)
    return ids + tok.encode(QUESTION, add_special_tokens=False)


def hf_choice_probs(folder: Path, ids: list[int], choices: list[list[int]]) -> list[float]:
    """transformers' log-probability of each choice's tokens after ``ids``, normalised."""
    scores = []
    for tokens in choices:
        total = 0.0
        for j, token in enumerate(tokens):
            total += torch.log_softmax(hf_last_logits(folder, ids + tokens[:j]), -1)[token].item()
        scores.append(total)
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


async def classify(engine: Engine, sid: str, choices: list[str], **fields):
    req = GenerateRequest(prompt=QUESTION, choices=choices, **fields)
    return await engine.generate(sid, req).result()


def check_against_hf(folder: Path, tok, entries: list[str], choices: list[str], done) -> None:
    tokens = [tok.encode(c, add_special_tokens=False) for c in choices]
    expected = hf_choice_probs(folder, context_ids(tok, entries), tokens)
    best = max(range(len(choices)), key=expected.__getitem__)
    assert done.choice == done.text == choices[best]
    assert done.tokens == tokens[best]
    assert done.finish_reason == "stop"
    assert list(done.probs) == choices
    assert abs(sum(done.probs.values()) - 1.0) < 1e-9
    for choice, p in zip(choices, expected, strict=True):
        assert abs(done.probs[choice] - p) < 1e-4, (choice, done.probs[choice], p)


def test_choices_match_transformers(family_folder, hf_tokenizer, device, tmp_path) -> None:
    model = loaded(family_folder, tmp_path, device=device)
    tokens = {c: hf_tokenizer.encode(c, add_special_tokens=False) for c in SINGLE + MULTI}
    assert all(len(tokens[c]) == 1 for c in SINGLE)
    assert sum(len(tokens[c]) > 1 for c in MULTI) >= 3  # the multi-token path is taken

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        await engine.push(sid, feed(5))
        first = (await classify(engine, sid, SINGLE), await classify(engine, sid, MULTI))
        await engine.push(sid, feed(9)[5:])
        return first, (await classify(engine, sid, SINGLE), await classify(engine, sid, MULTI))

    (single5, multi5), (single9, multi9) = run_engine(model, scenario)
    for entries, single, multi in ((feed(5), single5, multi5), (feed(9), single9, multi9)):
        assert single.data_seq == multi.data_seq == len(entries)
        assert single.usage.context_tokens + single.usage.prompt_tokens == len(
            context_ids(hf_tokenizer, entries)
        )
        check_against_hf(family_folder, hf_tokenizer, entries, SINGLE, single)
        check_against_hf(family_folder, hf_tokenizer, entries, MULTI, multi)


def test_long_choices_split_across_steps_beside_a_generated_answer(
    family_folder, hf_tokenizer, device, tmp_path
) -> None:
    """More choice tokens than one step holds (max_batch_tokens 64), while an ordinary query
    prefills and decodes in the same steps: both answers stay exact."""
    model = loaded(family_folder, tmp_path, device=device)
    choices = [f" the price closed at {100 + 7 * i}.{i}5 and rose" for i in range(8)]
    assert sum(len(hf_tokenizer.encode(c, add_special_tokens=False)) for c in choices) > 64

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT, template="raw"))).session_id
        await engine.push(sid, feed(4))
        plain = engine.generate(sid, GenerateRequest(prompt=QUESTION, max_tokens=6))
        return await asyncio.gather(classify(engine, sid, choices), plain.result())

    done, plain = run_engine(model, scenario)
    check_against_hf(family_folder, hf_tokenizer, feed(4), choices, done)
    ids = context_ids(hf_tokenizer, feed(4))
    expected = hf_greedy(family_folder, ids, 6)
    assert plain.tokens == expected[: len(plain.tokens)]
    assert plain.finish_reason == "stop" or len(plain.tokens) == 6


def test_chat_session_scores_after_the_question_suffix(
    family_folder, hf_tokenizer, tmp_path
) -> None:
    model = loaded(family_folder, tmp_path)
    entries = feed(3)

    async def scenario(engine: Engine):
        sid = (await engine.init_session(InitRequest(prompt=PROMPT))).session_id
        await engine.push(sid, entries)
        return await classify(engine, sid, MULTI)

    done = run_engine(model, scenario)
    user = "".join(e + "\n" for e in entries) + QUESTION
    messages = [{"role": "system", "content": PROMPT}, {"role": "user", "content": user}]
    rendered = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    ids = hf_tokenizer.encode(rendered, add_special_tokens=False)
    tokens = [hf_tokenizer.encode(c, add_special_tokens=False) for c in MULTI]
    expected = hf_choice_probs(family_folder, ids, tokens)
    for choice, p in zip(MULTI, expected, strict=True):
        assert abs(done.probs[choice] - p) < 1e-4


# ---- over HTTP, against the demo daemon ---------------------------------------------------------
def _post(daemon, path: str, body: dict) -> requests.Response:
    return requests.post(f"{daemon.url}{path}", json=body, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def demo_session(demo_daemon) -> str:
    reply = _post(demo_daemon, "/v1/sessions/init", {"prompt": "Market feed.", "format": "ohlcv"})
    sid = reply.json()["session_id"]
    bars = [
        {"t": 1000 + i, "o": 10 + i, "h": 11 + i, "l": 9 + i, "c": 10.5 + i, "v": 100}
        for i in range(6)
    ]
    assert _post(demo_daemon, f"/v1/sessions/{sid}/stream/push", {"data": bars}).status_code == 200
    return sid


def test_classification_over_http(demo_daemon, demo_session) -> None:
    choices = ["up", "down", "flat"]
    body = {"prompt": "Trend?", "choices": choices}
    reply = _post(demo_daemon, f"/v1/sessions/{demo_session}/generate", body)
    assert reply.status_code == 200, reply.text
    done = reply.json()
    assert done["choice"] in choices and done["text"] == done["choice"]
    assert set(done["probs"]) == set(choices)
    assert abs(sum(done["probs"].values()) - 1.0) < 1e-9
    assert done["choice"] == max(choices, key=done["probs"].__getitem__)
    assert done["finish_reason"] == "stop" and done["data_seq"] == 6
    # streamed: the token events' texts add up to the choice, then the same reply
    reply = requests.post(
        f"{demo_daemon.url}/v1/sessions/{demo_session}/generate",
        json=body | {"stream": True},
        timeout=TIMEOUT,
    )
    events = _sse(reply.text)
    tokens = [data for name, data in events if name == "token"]
    assert events[-1][0] == "done" and events[-1][1]["probs"] == done["probs"]
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert [t["token"] for t in tokens] == done["tokens"]


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"choices": []}, "choices takes 2 to 64 strings, got 0"),
        ({"choices": ["up"]}, "choices takes 2 to 64 strings, got 1"),
        ({"choices": [f"c{i}" for i in range(65)]}, "choices takes 2 to 64 strings, got 65"),
        ({"choices": ["up", ""]}, "choices[1] is empty"),
        ({"choices": ["up", "down", "up"]}, "choices[2] repeats choices[0]"),
        ({"choices": ["up", "9" * 40]}, "choices[1] takes 40 tokens"),
        ({"choices": ["up", "down"], "temperature": 0.7}, "temperature cannot be combined"),
        ({"choices": ["up", "down"], "stop": ["\n"], "seed": 3}, "seed, stop cannot be combined"),
        ({"choices": ["up", "down"], "top_p": 0.5, "top_k": 5}, "top_p, top_k cannot be"),
        ({"choices": ["up", 3]}, "Expected `str`, got `int`"),
        ({"choices": "up"}, "Expected `array"),
    ],
)
def test_bad_choices_are_refused(demo_daemon, demo_session, fields: dict, message: str) -> None:
    reply = _post(
        demo_daemon, f"/v1/sessions/{demo_session}/generate", {"prompt": "Trend?"} | fields
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_request"
    assert message in error["message"]
    # the session still answers
    ok = _post(
        demo_daemon,
        f"/v1/sessions/{demo_session}/generate",
        {"prompt": "Trend?", "choices": ["a", "b"]},
    )
    assert ok.status_code == 200
