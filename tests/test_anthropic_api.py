"""The Anthropic-compatible endpoint against a real daemon, driven by the official anthropic SDK.

This SDK takes no sampling arguments, so temperature 0 (greedy) travels in ``extra_body``.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest
import requests

from tests.compat_helpers import (
    API_KEY,
    TIMEOUT,
    WEATHER_TOOL,
    open_raw_session,
    post,
    serve_scripted,
    session_generate,
    start_capped_demo_daemon,
)
from tests.daemon_process import DaemonProcess

GREEDY = {"temperature": 0}
CAP = 6  # max_new_tokens of the capped daemon
QUESTION = [{"role": "user", "content": "Is the trend up or down today?"}]
TOOL = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}


def _client(daemon: DaemonProcess, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(demo_daemon: DaemonProcess) -> anthropic.Anthropic:
    return _client(demo_daemon)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    yield from serve_scripted(tmp_path_factory.mktemp("anthropic-hermes"), "hermes")


def _greedy(client: anthropic.Anthropic, **kw) -> anthropic.types.Message:
    kw.setdefault("messages", QUESTION)
    return client.messages.create(model="demo", extra_body=GREEDY | kw.pop("extra", {}), **kw)


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_models_in_anthropics_shape(client: anthropic.Anthropic) -> None:
    (model,) = client.models.list().data
    assert (model.id, model.type, model.display_name) == ("demo", "model", "demo")
    assert client.models.retrieve("demo").id == "demo"


def test_a_prompt_past_the_context_is_too_long(client: anthropic.Anthropic) -> None:
    long = [{"role": "user", "content": "tick " * 9000}]  # the demo model's context is 8192
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        client.messages.create(model="demo", messages=long, max_tokens=4)


def test_message_equals_the_openai_chat_answer(client, demo_daemon: DaemonProcess) -> None:
    system = "You watch markets."
    message = _greedy(client, system=system, max_tokens=10)
    chat = openai.OpenAI(base_url=demo_daemon.url + "/v1", api_key="x", max_retries=0)
    reply = chat.chat.completions.create(
        model="demo",
        messages=[{"role": "system", "content": system}, *QUESTION],
        max_tokens=10,
        temperature=0,
    )
    assert _text(message) == reply.choices[0].message.content
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == "demo"
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    usage = message.usage
    assert usage.output_tokens == 10
    assert usage.input_tokens + usage.cache_read_input_tokens == reply.usage.prompt_tokens
    blocks = _greedy(client, system=[{"type": "text", "text": system}], max_tokens=10)
    assert _text(blocks) == _text(message)


def test_count_tokens_is_the_whole_prompt(client: anthropic.Anthropic) -> None:
    message = _greedy(client, system="Count me.", max_tokens=2)
    counted = client.messages.count_tokens(model="demo", system="Count me.", messages=QUESTION)
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens
    # a long request is rendered on a thread: same count as the same text in pieces
    long_system = "Gold climbed to a record. " * 800
    long = client.messages.count_tokens(model="demo", system=long_system, messages=QUESTION)
    pieces = [{"type": "text", "text": "Gold climbed to a record. "}] * 800
    assert client.messages.count_tokens(model="demo", system=pieces, messages=QUESTION) == long
    assert long.input_tokens > 800 * 5


def test_stream_events_and_helper(client: anthropic.Anthropic) -> None:
    plain = _greedy(client, max_tokens=8)
    events = list(_greedy(client, max_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:-2] == ["content_block_start"] + ["content_block_delta"] * (len(kinds) - 5) + [
        "content_block_stop"
    ]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == _text(plain)
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 8
    with client.messages.stream(
        model="demo", max_tokens=8, messages=QUESTION, extra_body=GREEDY
    ) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == _text(final) == _text(plain)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8


def test_stream_has_named_event_lines(demo_daemon: DaemonProcess) -> None:
    body = {"model": "demo", "max_tokens": 3, "messages": QUESTION, "stream": True} | GREEDY
    reply = requests.post(demo_daemon.url + "/v1/messages", json=body, timeout=TIMEOUT)
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    blocks = [b for b in reply.text.split("\n\n") if b.strip()]
    assert all(b.startswith("event: ") and "\ndata: {" in b for b in blocks)
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"


def test_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    full = _text(_greedy(client, max_tokens=16))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    message = _greedy(client, max_tokens=16, stop_sequences=["never-there", stop])
    assert _text(message) == full[: full.index(stop)]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    with client.messages.stream(
        model="demo", max_tokens=16, messages=QUESTION, stop_sequences=[stop], extra_body=GREEDY
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_session_id_asks_over_the_sessions_context(client, demo_daemon: DaemonProcess) -> None:
    session_id = open_raw_session(demo_daemon, "Notes.\n", ["Oil fell.", "Bonds rallied."])
    question = "What did bonds do?"
    expected = session_generate(demo_daemon, session_id, question, 6)
    message = _greedy(
        client,
        max_tokens=6,
        messages=[{"role": "user", "content": question}],
        extra={"session_id": session_id},
    )
    assert _text(message) == expected["text"]
    assert message.usage.cache_read_input_tokens == expected["usage"]["context_tokens"]


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"extra": {"temperature": -1}}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "Up"}]}, "prefill"),
        ({"tool_choice": {"type": "any"}, "tools": [TOOL]}, "tool_choice"),
    ],
)
def test_bad_requests_raise_bad_request_error(client, kw: dict, words: str) -> None:
    kw.setdefault("max_tokens", 4)
    with pytest.raises(anthropic.BadRequestError) as caught:
        _greedy(client, **kw)
    body = caught.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert words in body["error"]["message"]


def test_a_large_max_tokens_is_clamped_to_the_daemons_limit(client, tmp_path) -> None:
    """Agent clients (Claude Code) send max_tokens 32000; the answer stops at the daemon's
    max_new_tokens instead of the request being refused."""
    expected = _greedy(client, max_tokens=CAP)
    daemon = start_capped_demo_daemon(tmp_path, CAP)
    try:
        message = _greedy(_client(daemon), max_tokens=32000)
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == CAP
        assert _text(message) == _text(expected)
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_missing_max_tokens_is_a_400_in_anthropic_shape(demo_daemon: DaemonProcess) -> None:
    reply = post(demo_daemon, "/v1/messages", {"model": "demo", "messages": QUESTION})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in reply.json()["error"]["message"]


def test_unknown_model_and_session_raise_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError, match="claude-x"):
        client.messages.create(model="claude-x", max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.NotFoundError, match="nope"):
        _greedy(client, max_tokens=4, extra={"session_id": "nope"})


def test_api_key_is_checked_in_anthropic_shape(scripted: DaemonProcess) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        _client(scripted, "wrong").messages.create(
            model="scripted-hermes", max_tokens=4, messages=QUESTION
        )
    assert caught.value.response.json()["error"]["type"] == "authentication_error"


def _weather(client: anthropic.Anthropic, **kw) -> anthropic.types.Message:
    kw.setdefault("messages", [{"role": "user", "content": "Weather in Paris?"}])
    return client.messages.create(
        model="scripted-hermes", max_tokens=64, tools=[TOOL], extra_body=GREEDY, **kw
    )


def _assert_tool_use(message) -> None:
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather" and block.input == {"city": "Paris"}


def test_tool_use_end_to_end(scripted: DaemonProcess) -> None:
    client = _client(scripted, API_KEY)
    message = _weather(client)
    _assert_tool_use(message)
    block = message.content[0]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [block.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "21 C, sunny"}],
        },
    ]
    again = _weather(client, messages=messages)

    def prompt(m: anthropic.types.Message) -> int:
        return m.usage.input_tokens + m.usage.cache_read_input_tokens

    assert prompt(again) > prompt(message)
    assert again.usage.cache_read_input_tokens > 0  # the first turn's prompt was reused
    _assert_tool_use(again)


def test_streamed_tool_use_through_the_helper(scripted: DaemonProcess) -> None:
    client = _client(scripted, API_KEY)
    with client.messages.stream(
        model="scripted-hermes",
        max_tokens=64,
        tools=[TOOL],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_body=GREEDY,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    _assert_tool_use(final)


def test_a_cut_tool_call_stays_text_in_both_shapes(scripted: DaemonProcess) -> None:
    """Stopped inside the call, the held-back text is not a call: it is the answer's text."""
    client = _client(scripted, API_KEY)
    message = _weather(client, stop_sequences=["Paris"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "Paris"
    assert _text(message).startswith("<tool_call>") and _text(message).endswith('"city": "')
    with client.messages.stream(
        model="scripted-hermes",
        max_tokens=64,
        tools=[TOOL],
        stop_sequences=["Paris"],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_body=GREEDY,
    ) as stream:
        final = stream.get_final_message()
    assert _text(final) == _text(message) and final.stop_reason == "stop_sequence"
