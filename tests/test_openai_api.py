"""The OpenAI-compatible endpoints against a real daemon, driven by the official openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from livelm.daemon.model.demo import ensure_demo_model
from tests.compat_helpers import (
    API_KEY,
    WEATHER_TOOL,
    open_raw_session,
    post,
    serve_scripted,
    session_generate,
    start_capped_demo_daemon,
    start_scripted_daemon,
)
from tests.daemon_process import DaemonProcess
from tests.tiny_models import _transformers

QUESTION = [{"role": "user", "content": "Is the trend up or down today?"}]
CAP = 6  # max_new_tokens of the capped daemon


def _client(daemon: DaemonProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(demo_daemon: DaemonProcess) -> openai.OpenAI:
    return _client(demo_daemon)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    yield from serve_scripted(tmp_path_factory.mktemp("openai-hermes"), "hermes")


def _greedy(client: openai.OpenAI, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="demo", temperature=0, **kw)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.response.json()["error"]["code"] == "model_not_found"


def test_a_prompt_past_the_context_says_so_in_openais_words(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "tick " * 9000}]  # the demo model's context is 8192
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=long, max_tokens=4)
    error = caught.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("prompt is too long: ")


def test_chat_equals_a_completion_of_transformers_template_tokens(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    messages = [{"role": "system", "content": "You watch markets."}, *QUESTION]
    reply = _greedy(client, messages=messages, max_tokens=12)
    hf = _transformers().AutoTokenizer.from_pretrained(ensure_demo_model(tmp_path))
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    raw = client.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == raw.choices[0].text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == raw.choices[0].finish_reason
    assert reply.usage.prompt_tokens == raw.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == raw.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.id.startswith("chatcmpl-") and raw.id.startswith("cmpl-")


def test_completion_equals_the_engines_own_generate(
    client: openai.OpenAI, demo_daemon: DaemonProcess
) -> None:
    """A raw session with an empty prompt is [BOS]; a question appends enc(prompt): the same
    tokens /v1/completions gives a text prompt."""
    session_id = open_raw_session(demo_daemon, "", [])
    prompt = "The market opened higher"
    expected = session_generate(demo_daemon, session_id, prompt, 10)
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected["text"]
    assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
    listed = client.completions.create(model="demo", prompt=[prompt], max_tokens=10, temperature=0)
    assert listed.choices[0].text == expected["text"]
    default = client.completions.create(model="demo", prompt=prompt, temperature=0)
    assert default.choices[0].text.startswith(expected["text"])
    # OpenAI's default max_tokens for this endpoint is 16
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


def test_session_id_asks_over_the_sessions_context(
    client: openai.OpenAI, demo_daemon: DaemonProcess
) -> None:
    session_id = open_raw_session(
        demo_daemon, "Market notes.\n", ["Shares rose on Monday.", "Gold climbed to a record."]
    )
    question = "What happened to gold?"
    expected = session_generate(demo_daemon, session_id, question, 8)
    extra = {"session_id": session_id}
    chat = _greedy(
        client, messages=[{"role": "user", "content": question}], max_tokens=8, extra_body=extra
    )
    assert chat.choices[0].message.content == expected["text"]
    text = client.completions.create(
        model="demo", prompt=question, max_tokens=8, temperature=0, extra_body=extra
    )
    assert text.choices[0].text == expected["text"]
    # the session's context counts as prompt, and its KV was there already
    context = expected["usage"]["context_tokens"]
    assert chat.usage.prompt_tokens == context + expected["usage"]["prompt_tokens"]
    assert chat.usage.prompt_tokens_details.cached_tokens == context


def test_stream_chunks_add_up_to_the_plain_reply(client: openai.OpenAI) -> None:
    plain = _greedy(client, messages=QUESTION, max_tokens=10)
    chunks = list(
        _greedy(
            client,
            messages=QUESTION,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1
    without_usage = list(_greedy(client, messages=QUESTION, max_tokens=10, stream=True))
    assert all(c.usage is None for c in without_usage)


def _visible_stop(text: str) -> str:
    """Two characters from the middle of ``text``, to stop an answer there."""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    return stop


def test_stream_helper_gives_the_final_completion(client: openai.OpenAI) -> None:
    # the helper refuses answers cut by length, so this one ends at a stop string
    full = _greedy(client, messages=QUESTION, max_tokens=16).choices[0].message.content
    stop = _visible_stop(full)
    with client.chat.completions.stream(
        model="demo", messages=QUESTION, max_tokens=16, temperature=0, stop=stop
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert "".join(deltas) == final.choices[0].message.content == full[: full.index(stop)]


def test_stream_of_text_completion(client: openai.OpenAI) -> None:
    kw = {"model": "demo", "prompt": "Gold climbed", "max_tokens": 8, "temperature": 0}
    plain = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stop_strings_end_the_answer_before_them(client: openai.OpenAI) -> None:
    full = _greedy(client, messages=QUESTION, max_tokens=16).choices[0].message.content
    stop = _visible_stop(full)
    expected = full[: full.index(stop)]
    for given in (stop, ["never-there", stop]):
        reply = _greedy(client, messages=QUESTION, max_tokens=16, stop=given)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"


def test_max_tokens_and_max_completion_tokens_cut_with_length(client: openai.OpenAI) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        reply = _greedy(client, messages=QUESTION, **{field: 3})
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 3


def test_a_completions_max_tokens_of_null_means_openais_default(demo_daemon) -> None:
    body = {"model": "demo", "prompt": "Once upon", "temperature": 0, "max_tokens": None}
    reply = requests.post(f"{demo_daemon.url}/v1/completions", json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 16, reply
    assert reply["choices"][0]["finish_reason"] == "length"


def test_a_large_max_tokens_is_clamped_to_the_daemons_limit(client, tmp_path) -> None:
    """A max_tokens above the daemon's max_new_tokens ends the answer there (``length``)."""
    expected = _greedy(client, messages=QUESTION, max_tokens=CAP).choices[0].message.content
    daemon = start_capped_demo_daemon(tmp_path, CAP)
    try:
        for field in ("max_tokens", "max_completion_tokens"):
            reply = _greedy(_client(daemon), messages=QUESTION, **{field: 10**9})
            assert reply.choices[0].finish_reason == "length"
            assert reply.usage.completion_tokens == CAP
            assert reply.choices[0].message.content == expected
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_a_repeated_prompt_reuses_cached_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "A question asked twice, about bond yields."}]
    first = _greedy(client, messages=messages, max_tokens=4)
    second = _greedy(client, messages=messages, max_tokens=4)
    assert second.choices[0].message.content == first.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    assert cached >= first.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"n": 2}, "n must be 1"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"messages": []}, "messages is empty"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "image_url",
        ),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"logprobs": True}, "logprobs"),
        ({"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
    ],
)
def test_bad_requests_raise_bad_request_error(client: openai.OpenAI, kw: dict, words: str) -> None:
    body = {"messages": QUESTION, "max_tokens": 4} | kw
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", **body)
    error = caught.value.response.json()["error"]
    assert words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_unknown_model_and_session_raise_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="no-such-session"):
        _greedy(
            client, messages=QUESTION, max_tokens=4, extra_body={"session_id": "no-such-session"}
        )


def test_unknown_fields_are_ignored(client: openai.OpenAI) -> None:
    plain = _greedy(client, messages=QUESTION, max_tokens=5)
    extra = {"frobnicate": True, "user": "me", "metadata": {"a": "b"}}
    reply = _greedy(client, messages=QUESTION, max_tokens=5, extra_body=extra)
    assert reply.choices[0].message.content == plain.choices[0].message.content
    # settings at the values that change nothing are accepted
    neutral = _greedy(
        client, messages=QUESTION, max_tokens=5, response_format={"type": "text"},
        frequency_penalty=0, presence_penalty=0, logit_bias={}, parallel_tool_calls=True,
    )
    assert neutral.choices[0].message.content == plain.choices[0].message.content


def test_api_key_is_checked_in_openai_shape(scripted: DaemonProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(scripted, "wrong-key").models.list()
    assert set(caught.value.response.json()["error"]) == {"message", "type", "param", "code"}
    assert [m.id for m in _client(scripted, API_KEY).models.list().data] == ["scripted-hermes"]


def _weather_call(client: openai.OpenAI, **kw) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    return client.chat.completions.create(
        model="scripted-hermes", messages=kw.pop("messages", messages), tools=[WEATHER_TOOL], **kw
    )


def _assert_weather(message) -> None:
    (call,) = message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_end_to_end(scripted: DaemonProcess) -> None:
    client = _client(scripted, API_KEY)
    reply = _weather_call(client, temperature=0)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.content is None
    _assert_weather(reply.choices[0].message)
    # the call and its result go back in; the template renders both (the script calls again)
    call = reply.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    again = _weather_call(client, messages=messages, temperature=0)
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens
    _assert_weather(again.choices[0].message)


def test_streamed_tool_call_through_the_helper(scripted: DaemonProcess) -> None:
    client = _client(scripted, API_KEY)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.chat.completions.stream(
        model="scripted-hermes", messages=messages, tools=[WEATHER_TOOL], temperature=0
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    _assert_weather(final.choices[0].message)


def test_without_tools_the_call_text_stays_content(scripted: DaemonProcess) -> None:
    client = _client(scripted, API_KEY)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model="scripted-hermes", messages=messages, temperature=0
    )
    assert reply.choices[0].message.content.startswith("<tool_call>")
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    none = _weather_call(client, temperature=0, tool_choice="none")
    assert none.choices[0].message.content == reply.choices[0].message.content


def test_a_cut_tool_call_stays_content(scripted: DaemonProcess) -> None:
    client = _client(scripted, API_KEY)
    plain = _weather_call(client, temperature=0, stop="Paris")
    content = plain.choices[0].message.content
    assert content.startswith("<tool_call>") and content.endswith('"city": "')
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
    chunks = list(_weather_call(client, temperature=0, stop="Paris", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content


def test_llama3_tool_call_end_to_end(tmp_path_factory: pytest.TempPathFactory) -> None:
    daemon = start_scripted_daemon(tmp_path_factory.mktemp("openai-llama3"), "llama3")
    try:
        client = _client(daemon, API_KEY)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        reply = client.chat.completions.create(
            model="scripted-llama3", messages=messages, tools=[WEATHER_TOOL], temperature=0
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        _assert_weather(reply.choices[0].message)
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_errors_keep_the_daemon_serving(client: openai.OpenAI, demo_daemon: DaemonProcess) -> None:
    for body in ([1, 2], {"model": "demo"}, {"model": "demo", "messages": "hi"}):
        assert post(demo_daemon, "/v1/chat/completions", body).status_code == 400
    assert (
        post(demo_daemon, "/v1/completions", {"model": "demo", "prompt": {"a": 1}}).status_code
        == 400
    )
    assert _greedy(client, messages=QUESTION, max_tokens=2).usage.completion_tokens == 2
