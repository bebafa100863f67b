"""Conversations rendered and tokenized exactly as transformers' apply_chat_template does,
for the demo and tiny tokenizers, including tools, prior tool calls and tool results; and
OpenAI's and Anthropic's message shapes converted into the same conversation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from livelm.daemon.http import anthropic_requests, openai_requests
from livelm.daemon.model import chat
from livelm.daemon.model.demo import ensure_demo_model
from livelm.daemon.model.tokenizer import Tokenizer
from tests.compat_helpers import WEATHER_TOOL
from tests.scripted_model import make_scripted_checkpoint
from tests.tiny_models import _transformers, train_test_tokenizer

TOOLS = [WEATHER_TOOL]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
PLAIN = [
    {"role": "system", "content": "You watch the markets."},
    {"role": "user", "content": "Is the trend up?"},
    {"role": "assistant", "content": "Yes, it is up."},
    {"role": "user", "content": "Café, 東京 and 🚀: how about now?"},
]
WITH_TOOLS = [
    {"role": "system", "content": "You answer with tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1", "name": "get_weather"},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-render")
    found = {"demo": ensure_demo_model(root / "cache")}
    for style in ("llama3", "chatml"):
        train_test_tokenizer(root / style, style)
        found[style] = root / style
    found["hermes"] = make_scripted_checkpoint(root / "hermes", "hermes")
    return found


def _reference(folder: Path, messages: list[dict[str, Any]], tools: Any) -> list[int]:
    tokenizer = _transformers().AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("name", ["demo", "llama3", "chatml", "hermes"])
def test_plain_conversation_matches_transformers(folders: dict[str, Path], name: str) -> None:
    tokenizer = Tokenizer.from_folder(folders[name])
    assert chat.prompt_tokens(tokenizer, PLAIN) == _reference(folders[name], PLAIN, None)


@pytest.mark.parametrize("name", ["llama3", "chatml", "hermes"])
def test_tools_and_tool_turns_match_transformers(folders: dict[str, Path], name: str) -> None:
    tokenizer = Tokenizer.from_folder(folders[name])
    messages = WITH_TOOLS if name != "chatml" else WITH_TOOLS[:2]  # its template has no tool turns
    expected = _reference(folders[name], messages, TOOLS)
    assert chat.prompt_tokens(tokenizer, messages, TOOLS) == expected
    # the tools really are in the prompt
    assert expected != _reference(folders[name], messages, None)


def test_openai_messages_convert_to_the_same_conversation(folders: dict[str, Path]) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "You answer with tools."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in "},
                    {"type": "text", "text": "Paris?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": TOOLS,
    }
    req = msgspec.convert(body, openai_requests.ChatCompletionRequest)
    messages = openai_requests.conversation(req.messages)
    tools = openai_requests.tools_for_template(req.tools)
    tokenizer = Tokenizer.from_folder(folders["hermes"])
    expected = _reference(folders["hermes"], WITH_TOOLS, TOOLS)
    assert chat.prompt_tokens(tokenizer, messages, tools) == expected


def test_anthropic_messages_convert_to_the_same_conversation(folders: dict[str, Path]) -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "You answer with tools."}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp": 21}'},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather in a city",
                "input_schema": TOOLS[0]["function"]["parameters"],
            }
        ],
    }
    req = msgspec.convert(body, anthropic_requests.MessagesRequest)
    messages = anthropic_requests.conversation(req)
    tools = anthropic_requests.tools_for_template(req.tools)
    tokenizer = Tokenizer.from_folder(folders["hermes"])
    expected = _reference(folders["hermes"], WITH_TOOLS, TOOLS)
    assert chat.prompt_tokens(tokenizer, messages, tools) == expected
