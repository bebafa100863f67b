"""A conversation (system, user, assistant with tool calls, tool results) and its tools as
the prompt tokens the model expects: the model's own chat template, then the tokenizer.

Messages use the shape Hugging Face chat templates read, which both API families are
converted to:
``{"role": "system" | "user" | "tool", "content": str}`` (a tool result also carries
``tool_call_id`` and ``name``) and ``{"role": "assistant", "content": str, "tool_calls":
[{"id", "type": "function", "function": {"name", "arguments": dict}}]}``. Tools use OpenAI's
``{"type": "function", "function": {"name", "description", "parameters"}}``.
"""

from __future__ import annotations

import json
from typing import Any

from livelm.daemon.model.tokenizer import Tokenizer

Message = dict[str, Any]


def system_message(content: str) -> Message:
    return {"role": "system", "content": content}


def user_message(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant_message(content: str, tool_calls: list[Message] | None = None) -> Message:
    message: Message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def tool_call(call_id: str, name: str, arguments: Any) -> Message:
    """A prior tool call; ``arguments`` as a dict (a JSON string of an object is decoded),
    since templates write it with ``tojson``."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": _arguments_value(arguments)},
    }


def tool_message(content: str, call_id: str, name: str | None) -> Message:
    message: Message = {"role": "tool", "content": content, "tool_call_id": call_id}
    if name is not None:
        message["name"] = name
    return message


def function_tool(name: str, description: str | None, parameters: dict[str, Any]) -> Message:
    # key order as OpenAI writes it: templates dump tools with tojson, so it shows in the prompt
    function: Message = {"name": name}
    if description is not None:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def render_prompt(
    tokenizer: Tokenizer, messages: list[Message], tools: list[Message] | None = None
) -> str:
    """The chat template over ``messages`` with the assistant's header appended."""
    return tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools or None)


def prompt_tokens(
    tokenizer: Tokenizer, messages: list[Message], tools: list[Message] | None = None
) -> list[int]:
    """Token ids of the rendered conversation, as transformers' ``apply_chat_template(...,
    tokenize=True)`` gives them: special tokens written by the template become their ids, and
    nothing is added (the template writes the BOS itself where the model has one)."""
    return tokenizer.encode(render_prompt(tokenizer, messages, tools))


def _arguments_value(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        decoded = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # not JSON: the template shows the string as the client sent it
    return decoded if isinstance(decoded, dict) else arguments
